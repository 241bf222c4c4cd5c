"""Stands in for training in the SLURM requeue test: `preempt_probe.py OUT_DIR`.

First attempt: writes OUT_DIR/attempt0-rank<R>.ready, waits for SIGUSR1, exits with REQUEUE_EXIT_CODE (what
training does after saving). After the requeue (SLURM_RESTART_COUNT=1): writes its marker and exits 0.
"""

import os
import signal
import sys
import time
from pathlib import Path

from unmask.launcher.env import REQUEUE_EXIT_CODE, discover

out = Path(sys.argv[1])
attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
received: list[int] = []
signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
dist = discover()
(out / f"attempt{attempt}-rank{dist.rank}.ready").write_text(f"{dist}\n")
if attempt:
    sys.exit(0)
deadline = time.monotonic() + 300
while not received and time.monotonic() < deadline:
    time.sleep(0.1)
time.sleep(1)  # a second copy of the signal (SLURM's and the agent's) may still arrive
(out / f"attempt{attempt}-rank{dist.rank}.signals").write_text(f"{len(received)}\n")
sys.exit(REQUEUE_EXIT_CODE if received else 1)
