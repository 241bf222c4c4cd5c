"""Shared by the resume tests: `unmask train` under torchrun (DeepSpeed ZeRO-2, fp32, gloo) on the tiny shards, and
the full training state of a checkpoint in layout-free form (DeepSpeed's universal checkpoint)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.support.runs import HANG_GUARD_S, REPO, tiny_cli_args
from unmask.checkpoint.reshard import to_universal

# Pinned here rather than taken from configs/tiny.toml, so the tests do not move when the preset does. A constant
# lr after warmup: the schedule must not depend on train.steps, which differs between a run's halves.
ARGS = ("--parallel.engine=deepspeed", "--parallel.zero_stage=2", "--train.dtype=fp32", "--train.log_every=1",
        "--train.val_every=0", "--data.val_dir=", "--train.micro_batch_size=4", "--train.grad_accum=1",
        "--train.threads=1", "--optim.lr=3e-3", "--optim.warmup_steps=2",
        "--optim.decay=constant", "--checkpoint.interval_steps=4",
        "--checkpoint.keep_last=10")


def env() -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return out


def torchrun(nproc: int, *args: str, timeout: int = HANG_GUARD_S) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc.stdout


def train(nproc: int, shards: Path, run_dir: Path, *extra: str) -> str:
    """`unmask train` on `nproc` torchrun processes (data-parallel size nproc)."""
    return torchrun(nproc, "-m", "unmask", "train", *tiny_cli_args(shards, run_dir, *ARGS, *extra))


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def training_state(step: Path, scratch: Path) -> dict:
    """Every tensor a resume starts from, keyed by (parameter, state): fp32 weights, exp_avg, exp_avg_sq, Adam
    step, plus the LR schedule and DeepSpeed's step counters. Independent of the saving run's dp size."""
    folder = scratch / step.parent.parent.name / step.name
    to_universal(step / "engine", folder, [])
    out = {}
    for param in sorted(p for p in (folder / "zero").iterdir() if p.is_dir()):
        for f in sorted(param.iterdir()):
            value = torch.load(f, weights_only=False)
            out[(param.name, f.stem)] = value["param"] if isinstance(value, dict) else value
    model_states = torch.load(step / "engine" / "mp_rank_00_model_states.pt", weights_only=False)
    out[("lr_scheduler", "")] = model_states["lr_scheduler"]
    out[("global_steps", "")] = model_states["global_steps"]
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def loader_positions(step: Path) -> list[int]:
    return [torch.load(f, weights_only=True)["loader"]["position"] for f in sorted((step / "client").iterdir())]
