"""Graceful preemption: SIGTERM, SIGUSR1 (SLURM's pre-timeout signal) and SIGINT finish the current step,
save a checkpoint and exit with REQUEUE_EXIT_CODE, which the sbatch script turns into a requeue."""

from __future__ import annotations

import signal

from unmask.parallel import collective

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # acted on between steps: never in the middle of an update or a save

    def requested(self) -> bool:
        """True on every rank once any rank got a signal (torchrun/srun may deliver it to only some)."""
        return collective.any_rank(self.signum is not None)

    def restore(self) -> None:
        """Back to the previous handlers; after a preemption the signals stay ignored instead, so a duplicate
        (srun forwarding plus SLURM's timer) cannot kill the process while it exits with the requeue code."""
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_IGN if self.signum is not None else handler)
