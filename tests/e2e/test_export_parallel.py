"""TP=2, ZeRO-3 (DP=2), PP=2 and bf16 TP=2 + ZeRO-1 DeepSpeed checkpoints export to the weights of the
equivalent one-process run.

Adam's first steps move every weight by about +-lr whatever the gradient's size, so float-level differences
between layouts can flip a near-zero gradient's sign and move that weight by 2 lr. A small lr keeps that far
below the error a wrongly merged shard makes (the init's std, 0.02), so the comparison tests consolidation.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.support.runs import HANG_GUARD_S, tiny_cli_args
from unmask.checkpoint.consolidate import load_checkpoint_weights
from unmask.export.hf import export

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
COMMON = ("--train.steps=2", "--train.val_every=0", "--train.log_every=1", "--optim.lr=1e-4", "--train.threads=1",
          "--data.num_workers=0")


def torchrun(shards, run_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unmask",
           "train", *tiny_cli_args(shards, run_dir, *COMMON, "--parallel.engine=deepspeed", *extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


def local(shards, run_dir, *extra):
    from unmask.cli import main

    assert main(["train", *tiny_cli_args(shards, run_dir, *COMMON, *extra)]) == 0


def assert_same(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


# (layout, one process's micro-batch, tolerance). bf16: DeepSpeed's fp32 masters start from the bf16-rounded init
# (relative error 2^-9 of weights up to ~0.08), so they match the fp32 run to that rounding only.
LAYOUTS = [("--parallel.tp=2", 4, 5e-5), ("--parallel.zero_stage=3", 8, 5e-5), ("--parallel.pp=2", 4, 5e-5),
           ("--parallel.tp=2 --parallel.zero_stage=1 --train.dtype=bf16", 4, 5e-4)]


@pytest.mark.parametrize("layout, micro, atol", LAYOUTS)
def test_parallel_checkpoint_exports_the_single_process_weights(tiny_shards, tmp_path, layout, micro, atol):
    torchrun(tiny_shards, tmp_path / "parallel", *layout.split(), "--train.micro_batch_size=4")
    # TP=2 is one data-parallel replica; ZeRO-3 over 2 ranks is two: one process sees their global batch.
    local(tiny_shards, tmp_path / "single", f"--train.micro_batch_size={micro}")
    _, parallel = load_checkpoint_weights(tmp_path / "parallel")
    _, single = load_checkpoint_weights(tmp_path / "single")
    assert_same(parallel, single, atol)
    export(tmp_path / "parallel", tmp_path / "hf-parallel")
    export(tmp_path / "single", tmp_path / "hf-single")
    assert_same(load_file(tmp_path / "hf-parallel" / "model.safetensors"),
                load_file(tmp_path / "hf-single" / "model.safetensors"), atol)
    assert all(v.dtype == torch.float32 for v in parallel.values())
    if "bf16" in layout:  # the fp32 masters came back, not the bf16 module copies
        assert any((v != v.bfloat16().float()).any() for v in parallel.values())
