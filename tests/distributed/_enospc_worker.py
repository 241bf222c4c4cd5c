"""A 2-rank gloo process for the full-disk test: save one checkpoint, then shrink one rank's file-size limit
(RLIMIT_FSIZE: its writes fail as on a full disk) and save again.

usage (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): _enospc_worker.py RUN_DIR FAILING_RANK"""

from __future__ import annotations

import os
import resource
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from unmask.checkpoint import Checkpointer
from unmask.config import CheckpointConfig
from unmask.errors import CheckpointError


class FakeEngine:
    """Writes 256 KiB per rank, like an engine's shard."""

    def save(self, directory: str, tag: str) -> None:
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        (Path(directory) / tag / f"rank-{dist.get_rank()}.bin").write_bytes(os.urandom(256 * 1024))


def main() -> int:
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    rank = dist.get_rank()
    ckpt = Checkpointer(Path(sys.argv[1]), CheckpointConfig(keep_last=3), rank, dist.get_world_size())
    ckpt.save(1, FakeEngine(), {"step": 1}, {"step": 1})
    if rank == int(sys.argv[2]):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        ckpt.save(2, FakeEngine(), {"step": 2}, {"step": 2})
    except CheckpointError as e:
        print(f"unmask: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
