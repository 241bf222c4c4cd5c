"""Exact resume with two data-parallel ranks under DeepSpeed ZeRO-2 (fp32, gloo): a run interrupted at step 4 and
resumed to step 8 logs the very rows of the uninterrupted run (validation on the weight EMA included) and ends with
the same weights, optimizer state and EMA."""

from __future__ import annotations

import pytest
import torch
from _resume_common import assert_same_state, step_dir, train, training_state

from tests.support.runs import metrics, train_losses
from unmask.checkpoint.consolidate import load_checkpoint_weights

pytestmark = pytest.mark.distributed
TIMINGS = ("tokens_per_s", "model_tflops", "mfu", "peak_mem_gib")


def rows(run_dir) -> dict:
    """(step, is validation) -> row without timings; later rows win (a resumed run appends)."""
    return {(r["step"], "val_nelbo" in r): {k: v for k, v in r.items() if k not in TIMINGS} for r in metrics(run_dir)}


def test_zero2_two_ranks_resume_is_bit_identical(tiny_shards, tmp_path):
    ema = ("--train.ema_decay=0.9", "--train.val_every=4", f"--data.val_dir={tiny_shards / 'val'}",
           "--train.val_batches=2", "--train.val_time_samples=2")
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(2, tiny_shards, whole, "--train.steps=8", *ema)
    train(2, tiny_shards, split, "--train.steps=4", *ema)
    out = train(2, tiny_shards, split, "--train.steps=8", *ema)
    assert "resumed from" in out and "at step 4" in out
    a, b = train_losses(whole), train_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # every step, bit-identical floats
    ra, rb = rows(whole), rows(split)
    assert ra.keys() == rb.keys() and (8, True) in ra and ra[(8, True)]["val_weights"] == "ema"
    assert all(ra[k] == rb[k] for k in ra), [k for k in ra if ra[k] != rb[k]]
    for weights in ("raw", "ema"):
        _, wa = load_checkpoint_weights(step_dir(whole, 8), weights=weights)
        _, wb = load_checkpoint_weights(step_dir(split, 8), weights=weights)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # ZeRO-2: the EMA is the whole model's, the same on both ranks, so one file holds it
    assert [p.name for p in (step_dir(whole, 8) / "ema").iterdir()] == ["tp00-pp00-dp00000.pt"]
    ea = torch.load(step_dir(whole, 8) / "ema" / "tp00-pp00-dp00000.pt", weights_only=True)
    eb = torch.load(step_dir(split, 8) / "ema" / "tp00-pp00-dp00000.pt", weights_only=True)
    assert ea["updates"] == eb["updates"] == 8
    assert all(torch.equal(ea["tensors"][k], eb["tensors"][k]) for k in ea["tensors"])
    assert_same_state(training_state(step_dir(whole, 8), tmp_path / "u"), training_state(step_dir(split, 8),
                                                                                          tmp_path / "u"))
