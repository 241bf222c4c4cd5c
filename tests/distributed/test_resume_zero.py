"""Exact resume with two data-parallel ranks under DeepSpeed ZeRO-2 (fp32, gloo): a run interrupted at step 4 and
resumed to step 8 logs the very losses of the uninterrupted run and ends with the same weights and optimizer state."""

from __future__ import annotations

import pytest
import torch
from _resume_common import assert_same_state, step_dir, train, training_state

from tests.support.runs import train_losses
from unmask.checkpoint.consolidate import load_checkpoint_weights

pytestmark = pytest.mark.distributed


def test_zero2_two_ranks_resume_is_bit_identical(tiny_shards, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(2, tiny_shards, whole, "--train.steps=8")
    train(2, tiny_shards, split, "--train.steps=4")
    out = train(2, tiny_shards, split, "--train.steps=8")
    assert "resumed from" in out and "at step 4" in out
    a, b = train_losses(whole), train_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # every step, bit-identical floats
    _, wa = load_checkpoint_weights(step_dir(whole, 8))
    _, wb = load_checkpoint_weights(step_dir(split, 8))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert_same_state(training_state(step_dir(whole, 8), tmp_path / "u"), training_state(step_dir(split, 8),
                                                                                          tmp_path / "u"))
