"""Resuming with another data-parallel size (DeepSpeed ZeRO-2, fp32): 2 ranks -> 1 -> 2.

At each change the restored training state (fp32 weights, Adam moments and steps, LR schedule) equals the saved
one exactly, compared in DeepSpeed's layout-free universal form; the loader restarts from the saved global position,
so across both changes each sample of the epoch is consumed exactly once."""

from __future__ import annotations

import hashlib
import itertools
import json
import math

import pytest
import torch
from _resume_common import ARGS, assert_same_state, loader_positions, step_dir, torchrun, train, training_state

from tests.support.runs import REPO, metrics, tiny_cli_args, tiny_config
from unmask.checkpoint.reshard import check_supported, client_state
from unmask.errors import CheckpointError
from unmask.parallel.dims import ParallelDims
from unmask.train.loop import make_loader

pytestmark = pytest.mark.distributed
MB = 4  # micro-batch size; one micro-batch per step


def reload(nproc: int, shards, run_dir, step: int, out_dir, tmp_path) -> dict:
    """Restore `step` under `nproc` ranks and save what was restored into out_dir (_resume_reload.py)."""
    result = tmp_path / f"reload-{nproc}.json"
    args = tiny_cli_args(shards, run_dir, *ARGS, f"--checkpoint.resume={step_dir(run_dir, step)}")
    torchrun(nproc, str(REPO / "tests" / "distributed" / "_resume_reload.py"), str(result), str(out_dir), *args)
    return json.loads(result.read_text())


def digests(batches) -> list[str]:
    return [hashlib.sha1(row.numpy().tobytes()).hexdigest() for b in batches for row in b]


def test_dp_2_to_1_to_2(tiny_shards, tmp_path):
    run = tmp_path / "run"
    train(2, tiny_shards, run, "--train.steps=4")
    got = reload(1, tiny_shards, run, 4, tmp_path / "as-dp1", tmp_path)  # 2 -> 1: what a resume starts from
    assert got["step"] == 4 and got["positions"] == [4 * MB * 2]
    assert_same_state(training_state(step_dir(run, 4), tmp_path / "u"),
                      training_state(step_dir(tmp_path / "as-dp1", 4), tmp_path / "u"))
    out = train(1, tiny_shards, run, "--train.steps=8")
    assert "at step 4" in out
    got = reload(2, tiny_shards, run, 8, tmp_path / "as-dp2", tmp_path)  # 1 -> 2
    assert got["step"] == 8 and got["positions"] == [4 * MB * 2 + 4 * MB] * 2
    assert_same_state(training_state(step_dir(run, 8), tmp_path / "u"),
                      training_state(step_dir(tmp_path / "as-dp2", 8), tmp_path / "u"))
    out = train(2, tiny_shards, run, "--train.steps=12")
    assert "at step 8" in out

    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13)) and all(math.isfinite(r["loss"]) for r in rows)
    # The loader's own positions: each checkpoint's ranks agree, and each segment continues where the last ended.
    ends = {4: [32, 32], 8: [48], 12: [80, 80]}
    assert {s: loader_positions(step_dir(run, s)) for s in ends} == ends

    # Which samples those positions are: replay each segment's rank streams from the restored client states.
    cfg = tiny_config(tiny_shards, run, *ARGS)
    consumed = []
    for start, world, saved_world in ((None, 2, 2), (4, 1, 2), (8, 2, 1)):
        for rank in range(world):
            loader = make_loader(cfg, ParallelDims(dp=world, rank=rank), cfg.data.train_dir, loop=True)
            if start is not None:
                loader.load_state_dict(client_state(step_dir(run, start), saved_world, rank)["loader"])
            consumed += digests(itertools.islice(iter(loader), 4))
    # Shards are dealt to (rank, worker) slots, so the stream depends on the layout; across both re-deals no
    # sample is consumed twice (that none is skipped by the epoch's end: tests/unit/test_data_loader.py).
    assert len(consumed) == 80 and len(set(consumed)) == 80


def test_ranks_that_disagree_on_the_loader_position_are_refused(tmp_path):
    (tmp_path / "client").mkdir()
    for rank, position in enumerate((32, 36)):
        torch.save({"loader": {"position": position}, "rng": {}}, tmp_path / "client" / f"rank-{rank:05d}.pt")
    with pytest.raises(CheckpointError, match=r"different loader positions \[32, 36\]"):
        client_state(tmp_path, 2, 0)


@pytest.mark.parametrize("before, after, match", [
    ({"engine": "local"}, {}, "the run was saved with the local engine"),
    ({}, {"tp": 2}, "needs parallel.tp=1 and parallel.pp=1"),
    ({"zero_stage": 0}, {}, "cannot also switch between ZeRO-0 and ZeRO 1-2"),
    ({}, {"zero_stage": 3}, "the run resumes with parallel.zero_stage=3"),
])
def test_unsupported_changes_are_refused(tiny_shards, tmp_path, before, after, match):
    def cfg(fields):
        return tiny_config(tiny_shards, tmp_path, *ARGS, *(f"--parallel.{k}={v}" for k, v in fields.items()))

    with pytest.raises(CheckpointError, match=match):
        check_supported(tmp_path, cfg(before), cfg(after))
