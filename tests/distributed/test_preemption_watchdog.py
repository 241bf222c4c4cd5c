"""A rank blocked in a collective still honours preemption: the watchdog exits it with the requeue code within
launch.preempt_grace_seconds instead of waiting for the collective timeout."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from unmask.launcher.env import REQUEUE_EXIT_CODE
from unmask.parallel.dims import free_port

HERE = Path(__file__).parent
GRACE = 3.0


def _start(rank: int, port: int, faults: str) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "UNMASK_FAULTS": faults, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(HERE / "_watchdog_worker.py"), str(GRACE)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, text: str, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return
    raise AssertionError(f"process ended before printing {text!r}:\n{''.join(lines)}")


def test_sigterm_to_a_rank_blocked_in_a_collective_exits_with_the_requeue_code():
    port = free_port()
    faults = "step.end@3:1=pause"  # rank 1 stalls; rank 0 then blocks in the preemption check's all-reduce
    procs = [_start(0, port, faults), _start(1, port, faults)]
    try:
        out0, out1 = [], []
        _read_until(procs[1], "paused at step.end@3", out1)
        _read_until(procs[0], "ready", out0)
        time.sleep(1.0)  # rank 0 is now inside the all-reduce of step 3's preemption check
        assert procs[0].poll() is None, "".join(out0)
        sent = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        rc = procs[0].wait(timeout=GRACE + 30)
        waited = time.monotonic() - sent
        text = "".join(out0) + procs[0].stdout.read()
        assert rc == REQUEUE_EXIT_CODE, text
        assert GRACE - 0.5 <= waited < GRACE + 20, (waited, text)
        assert "did not end within 3 s" in text and "without saving" in text, text
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
