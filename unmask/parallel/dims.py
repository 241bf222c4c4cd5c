"""Parallel degrees: dp * tp * pp == world size, validated before any process group is made."""

from __future__ import annotations

import os
from dataclasses import dataclass

from unmask.config import Config
from unmask.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    rank: int = 0
    dp_rank: int = 0

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as set by torchrun (RANK/WORLD_SIZE); one process otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_parallel(cfg: Config) -> ParallelDims:
    """Validate the layout against the world size. Multi-process process groups arrive with the
    parallel engines; a single process needs none."""
    rank, world = world_from_env()
    p = cfg.parallel
    if world % (p.tp * p.pp):
        raise ConfigError(f"world size {world} is not divisible by parallel.tp * parallel.pp = {p.tp * p.pp}")
    if world > 1 or p.tp > 1 or p.pp > 1:
        raise ConfigError(f"world size {world} with tp={p.tp}, pp={p.pp} needs the parallel engines "
                          "(not available in this build); run a single process with tp=1, pp=1")
    return ParallelDims(dp=world // (p.tp * p.pp), tp=p.tp, pp=p.pp, rank=rank, dp_rank=rank)
