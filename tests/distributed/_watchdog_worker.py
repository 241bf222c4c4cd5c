"""A 2-rank gloo process for the preemption watchdog test: steps of one all-reduce each, the loop's fault point
and preemption check between them, exactly as unmask.train.loop orders them.

usage (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): _watchdog_worker.py GRACE_SECONDS"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from unmask import faults
from unmask.parallel import collective
from unmask.train.preemption import Preemption


def main() -> int:
    dist.init_process_group("gloo", timeout=timedelta(minutes=10))  # far longer than the test waits
    preemption = Preemption(float(sys.argv[1]))
    print(f"rank {dist.get_rank()} pid {os.getpid()} ready", flush=True)
    for step in range(1, 1000):
        collective.sum_floats([1.0])  # the step's work
        faults.hit("step.end", step)
        if preemption.requested():
            print(f"rank {dist.get_rank()}: preempted at step {step}", flush=True)
            return 3
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
