"""Checkpoints: exact resume, corrupted checkpoints, NaN skipping and rollback (single process, in-process)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.support.runs import metrics, tiny_config, train_losses
from unmask.checkpoint.store import verify
from unmask.diffusion.objective import MaskedDiffusion
from unmask.errors import CheckpointError
from unmask.train.loop import train

FAST = ("--train.steps=12", "--train.log_every=1", "--train.val_every=0", "--train.micro_batch_size=4",
        "--checkpoint.interval_steps=4", "--checkpoint.keep_last=3", "--train.threads=1")


def run(shards, run_dir, *extra):
    return train(tiny_config(shards, run_dir, *FAST, *extra))


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "step-00000012" / "engine" / "engine.pt", weights_only=True)["model"]


# duo: uniform-state diffusion whose curriculum (tau annealed from step 2 to 9) spans the resume at step 6.
DUO = ("--diffusion.objective=duo", "--model.time_conditioning=true", "--diffusion.curriculum_start=2",
       "--diffusion.curriculum_end=9")


@pytest.mark.parametrize("objective", [(), DUO], ids=["mdlm", "duo"])
def test_resume_is_bit_identical(tiny_shards, tmp_path, objective):
    run(tiny_shards, tmp_path / "whole", *objective)
    run(tiny_shards, tmp_path / "split", *objective, "--train.steps=6")  # stops at 6, last checkpoint at 6 (the end)
    run(tiny_shards, tmp_path / "split", *objective)  # resume auto: continues 7..12
    whole, split = train_losses(tmp_path / "whole"), train_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 13))
    assert [whole[s] for s in range(7, 13)] == [split[s] for s in range(7, 13)]  # bit-identical floats
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_retention_and_atomic_layout(tiny_shards, tmp_path):
    run(tiny_shards, tmp_path, "--checkpoint.keep_last=2", "--checkpoint.keep_every=4", "--checkpoint.interval_steps=2")
    root = tmp_path / "checkpoints"
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert kept == ["step-00000004", "step-00000008", "step-00000010", "step-00000012"]
    assert (root / "latest").read_text().strip() == "step-00000012"
    assert not list(root.glob(".tmp-*"))
    assert all(verify(root / k) is None for k in kept)


def test_corrupted_latest_falls_back_with_warning(tiny_shards, tmp_path):
    run(tiny_shards, tmp_path, "--train.steps=8")
    engine_file = tmp_path / "checkpoints" / "step-00000008" / "engine" / "engine.pt"
    data = bytearray(engine_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine_file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step-00000008 is unusable .*sha256"):
        run(tiny_shards, tmp_path)
    resumed = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in resumed][8:] == [5, 6, 7, 8, 9, 10, 11, 12]  # continued from step 4


def test_interrupted_save_is_ignored_and_cleaned(tiny_shards, tmp_path):
    run(tiny_shards, tmp_path, "--train.steps=8")
    root = tmp_path / "checkpoints"
    half = root / ".tmp-step-00000012"
    shutil.copytree(root / "step-00000008", half)  # what a kill -9 in the middle of a save leaves
    (half / "manifest.json").unlink()
    run(tiny_shards, tmp_path)
    assert not half.exists()
    assert sorted(train_losses(tmp_path)) == list(range(1, 13))
    assert verify(root / "step-00000012") is None


def test_resume_refuses_a_shape_change(tiny_shards, tmp_path):
    run(tiny_shards, tmp_path, "--train.steps=4")
    with pytest.raises(CheckpointError, match=r"model.n_layers=2 but this run has model.n_layers=3"):
        run(tiny_shards, tmp_path, "--model.n_layers=3")


def test_resume_accepts_new_lr_and_steps(tiny_shards, tmp_path):
    run(tiny_shards, tmp_path, "--train.steps=4")
    run(tiny_shards, tmp_path, "--train.steps=6", "--optim.lr=1e-4", "--optim.warmup_steps=0",
        "--optim.decay=constant")
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert rows[-1]["step"] == 6 and rows[-1]["lr"] == pytest.approx(1e-4)


def nan_at(steps: set[int], monkeypatch):
    """Make the objective's loss NaN at the given 0-based steps (a real non-finite loss through the engine)."""
    original = MaskedDiffusion.loss

    def loss(self, model, x0, key, prompt_mask=None):
        out = original(self, model, x0, key, prompt_mask)
        if key.step in steps:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MaskedDiffusion, "loss", loss)


def test_nan_steps_are_skipped_and_counted(tiny_shards, tmp_path, monkeypatch):
    nan_at({5, 9}, monkeypatch)
    run(tiny_shards, tmp_path)
    rows = {r["step"]: r for r in metrics(tmp_path) if "loss" in r}
    assert rows[12]["skipped_steps"] == 2 and rows[4]["skipped_steps"] == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "step-00000012" / "engine" / "engine.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_no_checkpoint_is_written_from_a_skipped_step(tiny_shards, tmp_path, monkeypatch):
    nan_at({7}, monkeypatch)  # step 8 (0-based 7) is skipped: its interval save moves to step 9
    run(tiny_shards, tmp_path, "--checkpoint.keep_last=9")
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-00000004", "step-00000009", "step-00000012"]


def test_k_bad_steps_in_a_row_roll_back_with_scaled_lr(tiny_shards, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = MaskedDiffusion.loss

    def loss(self, model, x0, key, prompt_mask=None):  # steps 5-7 fail the first time only
        out = original(self, model, x0, key, prompt_mask)
        if key.step in (5, 6, 7) and calls["n"] < 3:
            calls["n"] += 1
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(MaskedDiffusion, "loss", loss)
    run(tiny_shards, tmp_path, "--checkpoint.max_bad_steps=3", "--checkpoint.rollback_lr_scale=0.5",
        "--optim.warmup_steps=0", "--optim.decay=constant")
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10, 11, 12]  # rolled back to the step-4 checkpoint
    assert rows[-1]["lr"] == pytest.approx(0.5 * rows[0]["lr"]) and rows[-1]["skipped_steps"] == 3
