"""The weight EMA through the train loop (local engine, in-process): exact resume including the EMA-weighted
validation rows, no update on a skipped step, and consolidation of the saved EMA."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_resume import nan_at
from tests.support.runs import metrics, tiny_config
from unmask.checkpoint.consolidate import load_checkpoint_weights
from unmask.errors import CheckpointError
from unmask.train.ema import ema_file
from unmask.train.loop import train

FAST = ("--train.steps=12", "--train.log_every=1", "--train.val_every=4", "--train.val_batches=2",
        "--train.val_time_samples=2", "--train.micro_batch_size=4", "--checkpoint.interval_steps=4",
        "--checkpoint.keep_last=3", "--train.threads=1", "--train.ema_decay=0.9")


ONE = {"kind": "full", "tp_rank": 0, "pp_stage": 0, "dp_rank": 0}  # the layout of a one-process run


def run(shards, run_dir, *extra):
    return train(tiny_config(shards, run_dir, *FAST, *extra))


def step(run_dir, n):
    return run_dir / "checkpoints" / f"step-{n:08d}"


def test_resume_with_ema_is_bit_identical(tiny_shards, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(tiny_shards, whole)
    run(tiny_shards, split, "--train.steps=6")
    run(tiny_shards, split)
    rows = lambda d: {(r["step"], "val_nelbo" in r): r for r in metrics(d)}  # noqa: E731 - later rows win
    a, b = rows(whole), rows(split)
    assert b.keys() - a.keys() == {(6, True)}  # the first half validated at its end, step 6
    assert (4, True) in a and (12, True) in a
    drop = ("tokens_per_s", "model_tflops", "mfu", "peak_mem_gib")  # timings and memory differ
    for key in a:
        assert {k: v for k, v in a[key].items() if k not in drop} == {k: v for k, v in b[key].items()
                                                                       if k not in drop}, key
    assert a[(12, True)]["val_weights"] == "ema"
    ea = torch.load(ema_file(step(whole, 12), ONE), weights_only=True)
    eb = torch.load(ema_file(step(split, 12), ONE), weights_only=True)
    assert ea["updates"] == eb["updates"] == 12
    assert all(torch.equal(ea["tensors"][k], eb["tensors"][k]) for k in ea["tensors"])
    # auto = the EMA; it is not the raw weights; "raw" still gives them
    _, ema = load_checkpoint_weights(step(whole, 12))
    _, raw = load_checkpoint_weights(step(whole, 12), weights="raw")
    assert all(torch.equal(ema[k], ea["tensors"][k]) for k in ea["tensors"])  # local names are the plain ones
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_skipped_steps_do_not_update_the_ema(tiny_shards, tmp_path, monkeypatch):
    nan_at({5}, monkeypatch)
    run(tiny_shards, tmp_path, "--train.steps=8", "--train.val_every=0", "--data.val_dir=")
    assert torch.load(ema_file(step(tmp_path, 8), ONE), weights_only=True)["updates"] == 7


def test_ema_requested_from_a_checkpoint_without_one(tiny_shards, tmp_path):
    run(tiny_shards, tmp_path, "--train.steps=4", "--train.val_every=0", "--data.val_dir=", "--train.ema_decay=0")
    with pytest.raises(CheckpointError, match="no EMA"):
        load_checkpoint_weights(tmp_path, weights="ema")
    with pytest.warns(UserWarning, match="has no EMA"):
        run(tiny_shards, tmp_path, "--train.steps=8", "--train.val_every=0", "--data.val_dir=")
    assert torch.load(ema_file(step(tmp_path, 8), ONE), weights_only=True)["updates"] == 4


def test_distillation_teacher_is_the_ema_unless_raw_is_asked(tiny_shards, tmp_path):
    from unmask.distill.stage import prepare_config

    teacher = tmp_path / "teacher"
    run(tiny_shards, teacher, "--train.steps=4", "--train.val_every=0", "--data.val_dir=")
    student = tiny_config(tiny_shards, tmp_path / "student", *FAST)
    _, ema = load_checkpoint_weights(teacher, weights="ema")
    _, raw = load_checkpoint_weights(teacher, weights="raw")
    _, got = prepare_config(student, str(teacher))
    assert all(torch.equal(got[k], ema[k]) for k in ema)
    student.distill.teacher_weights = "raw"
    _, got = prepare_config(student, str(teacher))
    assert all(torch.equal(got[k], raw[k]) for k in raw) and any(not torch.equal(raw[k], ema[k]) for k in raw)
