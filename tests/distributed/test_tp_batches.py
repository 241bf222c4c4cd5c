"""One reader per tensor-parallel group: in a 2-rank TP=2 run only tensor-parallel rank 0 opens shards, the peer
receives the same micro-batches (same losses as when both ranks read), and both ranks save the same loader
position, from which a resume continues exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.support.runs import HANG_GUARD_S, REPO, tiny_cli_args, train_losses

pytestmark = pytest.mark.distributed

# Counts every training shard this rank opens (the loader's one read path), and can put back the old behaviour
# (each rank runs its own loader) to compare against.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import unmask.data.stream as stream_mod
    import unmask.train.loop as loop
    from unmask.cli import main

    out, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    opened = []
    verified = stream_mod.verified_shard  # the training stream's one read of a shard
    def counting(where, *args):
        opened.append(Path(where).name)
        return verified(where, *args)
    stream_mod.verified_shard = counting
    if mode == "every-rank-reads":
        loop.tensor_parallel_batches = lambda loader, dims: loader
    code = main(["train", *args])
    with open(f"{out}.{os.environ['RANK']}", "w") as f:
        json.dump({"opened": opened, "code": code}, f)
""")
COMMON = ("--parallel.engine=deepspeed", "--parallel.tp=2", "--train.log_every=1", "--train.val_every=0",
          "--train.threads=1", "--data.num_workers=0", "--train.micro_batch_size=4", "--train.grad_accum=2",
          "--checkpoint.interval_steps=2")


def run(shards, tmp_path, name: str, mode: str, *extra) -> list[dict]:
    script = tmp_path / "count_reads.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(out), mode, *tiny_cli_args(shards, tmp_path / name, *COMMON, *extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((tmp_path / f"{name}.json.{r}").read_text()) for r in range(2)]


def loader_states(run_dir, step: int) -> list[dict]:
    client = run_dir / "checkpoints" / f"step-{step:08d}" / "client"
    return [torch.load(client / f"rank-{r:05d}.pt", weights_only=True)["loader"] for r in range(2)]


def test_only_tensor_parallel_rank_0_reads_and_losses_and_resume_are_unchanged(tiny_shards, tmp_path):
    shared = run(tiny_shards, tmp_path, "shared", "tp-rank-0-reads", "--train.steps=4")
    before = run(tiny_shards, tmp_path, "before", "every-rank-reads", "--train.steps=4")
    assert shared[0]["opened"] and not shared[1]["opened"], [len(r["opened"]) for r in shared]
    assert before[0]["opened"] == before[1]["opened"]  # what the split saves: the peer read every shard again
    assert train_losses(tmp_path / "shared") == train_losses(tmp_path / "before")

    # Both ranks save the reader's position; a resume from step 2 continues the same batches.
    for step in (2, 4):
        a, b = loader_states(tmp_path / "shared", step)
        assert a == b and a["position"] > 0, (a, b)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    src = tmp_path / "shared" / "checkpoints" / "step-00000002"
    subprocess.run(["cp", "-r", str(src), str(resumed / "checkpoints")], check=True)
    run(tiny_shards, tmp_path, "resumed", "tp-rank-0-reads", "--train.steps=4")
    got, want = train_losses(resumed), train_losses(tmp_path / "shared")
    assert {s: got[s] for s in (3, 4)} == {s: want[s] for s in (3, 4)}, (got, want)
