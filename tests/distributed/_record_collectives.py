"""torchrun worker: wrap torch.distributed's tensor collectives, run training steps, validation, a checkpoint save
and the preemption check, and record every tensor's device beside the device declared for its group.

usage: _record_collectives.py OUT.json RUN_DIR; rank 0 writes {"calls": N, "wrong": [...]} for every rank."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from _parallel_common import make_cfg, train, write_result

NAMES = ["all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
         "reduce", "gather", "scatter", "all_to_all_single", "send", "recv", "isend", "irecv"]
calls: list[tuple[str, str, str]] = []


def record(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from unmask.parallel.collective import collective_device

        group = kwargs.get("group")
        declared = str(collective_device(group))
        for a in [*args, *kwargs.values()]:
            for t in a if isinstance(a, (list, tuple)) else [a]:
                if isinstance(t, torch.Tensor):
                    calls.append((name, str(t.device), declared))
        return fn(*args, **kwargs)
    return wrapper


def main() -> None:
    for name in NAMES:  # both modules: torch's object collectives call c10d's globals
        wrapped = record(name, getattr(c10d, name))
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)
    from unmask.checkpoint import Checkpointer
    from unmask.config import CheckpointConfig
    from unmask.train.preemption import Preemption

    cfg = make_cfg(parallel={"engine": "deepspeed", "zero_stage": 2})
    out = train(cfg, 2)  # steps, validation terms, all_reduce_dp
    dims = out["dims"]
    ckpt = Checkpointer(Path(sys.argv[2]), CheckpointConfig(), dims.rank, dims.world_size)
    ckpt.save(2, out["engine"], {"step": 2}, {})
    ckpt.due(2)
    preemption = Preemption(60.0)
    preemption.requested()
    preemption.restore()
    ckpt.find("auto")
    wrong = [c for c in calls if c[1] != c[2]]
    from unmask.parallel.collective import gather_objects

    everyone = gather_objects({"calls": len(calls), "wrong": wrong[:20]})
    write_result({"ranks": everyone})


if __name__ == "__main__":
    main()
