"""Graceful preemption: SIGTERM, SIGUSR1 (SLURM's pre-timeout signal) and SIGINT finish the current step,
save a checkpoint and exit with REQUEUE_EXIT_CODE, which the sbatch script turns into a requeue.

A rank blocked in a collective (a peer stalled or gone) never ends its step, and Python runs signal handlers only
between bytecodes of the main thread, so the handler alone would wait for the collective timeout. A watchdog
thread therefore learns of each signal through `signal.set_wakeup_fd` (written by the C-level handler, whatever
the main thread is doing); if the loop has not reached the next preemption check `grace_seconds` later, it exits
the process with REQUEUE_EXIT_CODE without saving: the requeued run resumes from the last checkpoint."""

from __future__ import annotations

import os
import signal
import sys
import threading

from unmask.launcher.env import REQUEUE_EXIT_CODE
from unmask.parallel import collective

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    def __init__(self, grace_seconds: float | None = None):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        self._step_ended = threading.Event()
        self._wakeup = None
        if grace_seconds is not None and threading.current_thread() is threading.main_thread():
            self._start_watchdog(grace_seconds)

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # acted on between steps: never in the middle of an update or a save

    def requested(self) -> bool:
        """True on every rank once any rank got a signal (torchrun/srun may deliver it to only some)."""
        if self.signum is not None:
            self._step_ended.set()  # this rank reached the step boundary: the loop saves, the watchdog stands down
        return collective.any_rank(self.signum is not None)

    def _start_watchdog(self, grace: float) -> None:
        read, write = os.pipe()
        os.set_blocking(write, False)  # set_wakeup_fd needs it: a signal handler must never block
        self._wakeup = (read, write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
        threading.Thread(target=self._watch, args=(read, grace), name="unmask-preemption-watchdog",
                         daemon=True).start()

    def _watch(self, read: int, grace: float) -> None:
        try:
            self._wait(read, grace)
        finally:
            os.close(read)

    def _wait(self, read: int, grace: float) -> None:
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                return
            if not data:  # restore() closed the pipe
                return
            if not any(b in {int(s) for s in SIGNALS} for b in data):
                continue
            if self._step_ended.wait(grace):
                return
            print(f"unmask: preemption signal received but the step did not end within {grace:g} s "
                  "(launch.preempt_grace_seconds; a rank is blocked in a collective): exiting with "
                  f"{REQUEUE_EXIT_CODE} without saving, the requeued run resumes from the last checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(REQUEUE_EXIT_CODE)

    def restore(self) -> None:
        """Back to the previous handlers; after a preemption the signals stay ignored instead, so a duplicate
        (srun forwarding plus SLURM's timer) cannot kill the process while it exits with the requeue code."""
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_IGN if self.signum is not None else handler)
        if self._wakeup is not None:
            read, write, previous = self._wakeup
            self._wakeup = None
            self._step_ended.set()
            signal.set_wakeup_fd(previous)
            os.close(write)
