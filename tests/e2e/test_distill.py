"""`unmask distill` end to end on a tiny teacher trained in-process: the loss falls, a resume mid-round is exact,
a round boundary hands the student's weights to the teacher, and the evaluation table is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.support.runs import metrics, tiny_config, train_losses
from unmask.distill.loop import distill
from unmask.train.loop import train

FAST = ("--train.threads=1", "--train.micro_batch_size=4", "--train.val_every=0", "--train.log_every=1",
        "--optim.warmup_steps=0", "--optim.decay=constant")


@pytest.fixture(scope="module")
def teacher(tiny_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher")
    train(tiny_config(tiny_shards, run, *FAST, "--train.steps=30", "--train.val_batches=1"))
    return run


def student_config(shards, run, *overrides):
    return tiny_config(shards, run, *FAST, "--train.val_batches=1", "--distill.eval=false",
                       "--checkpoint.interval_steps=0", *overrides)


def checkpoint(run: Path, step: int) -> tuple[dict, dict, dict]:
    """(meta, student weights, teacher weights) of a saved step."""
    path = run / "checkpoints" / f"step-{step:08d}"
    meta = json.loads((path / "meta.json").read_text())
    student = torch.load(path / "engine" / "engine.pt", weights_only=True)["model"]
    client = torch.load(path / "client" / "rank-00000.pt", weights_only=True)
    return meta, student, client["teacher"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_loss_falls(tiny_shards, teacher, tmp_path):
    # One round 8 -> 4 steps: coarse steps give the student a clear gap to close.
    cfg = student_config(tiny_shards, tmp_path, "--distill.start_steps=8", "--distill.final_steps=4",
                         "--distill.steps_per_round=30", "--optim.lr=3e-3")
    distill(cfg, teacher=str(teacher))
    losses = list(train_losses(tmp_path).values())
    assert len(losses) == 30
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_resume_mid_round_is_exact(tiny_shards, teacher, tmp_path):
    args = ("--distill.start_steps=8", "--distill.final_steps=2", "--distill.steps_per_round=4")
    distill(student_config(tiny_shards, tmp_path / "full", *args), teacher=str(teacher))
    distill(student_config(tiny_shards, tmp_path / "split", *args), teacher=str(teacher), stop_at=6)  # round 1
    distill(student_config(tiny_shards, tmp_path / "split", *args), teacher=str(teacher))
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert list(full) == list(range(1, 9))
    assert full == split
    meta_full, student_full, teacher_full = checkpoint(tmp_path / "full", 8)
    meta_split, student_split, teacher_split = checkpoint(tmp_path / "split", 8)
    assert same(student_full, student_split) and same(teacher_full, teacher_split)
    assert (meta_split["round"], meta_split["teacher_steps"]) == (1, 4)


def test_round_boundary_replaces_the_teacher(tiny_shards, teacher, tmp_path):
    from unmask.checkpoint.consolidate import load_checkpoint_weights

    cfg = student_config(tiny_shards, tmp_path, "--distill.start_steps=8", "--distill.final_steps=2",
                         "--distill.steps_per_round=3", "--checkpoint.interval_steps=1", "--checkpoint.keep_last=9")
    distill(cfg, teacher=str(teacher))
    _, original = load_checkpoint_weights(teacher)
    meta2, _, teacher2 = checkpoint(tmp_path, 2)
    meta3, student3, teacher3 = checkpoint(tmp_path, 3)  # the boundary of round 0
    meta5, _, teacher5 = checkpoint(tmp_path, 5)
    meta6, _, teacher6 = checkpoint(tmp_path, 6)  # the end of the last round: no replacement after it
    assert same(teacher2, original) and (meta2["round"], meta2["teacher_steps"]) == (0, 8)
    assert not same(student3, original)
    assert same(teacher3, student3) and (meta3["round"], meta3["teacher_steps"]) == (1, 4)
    assert same(teacher5, student3) and meta5["round"] == 1
    assert same(teacher6, student3) and (meta6["round"], meta6["teacher_steps"]) == (1, 4)
    rounds = {r["step"]: r["teacher_steps"] for r in metrics(tmp_path) if "loss" in r}
    assert [rounds[s] for s in range(1, 7)] == [8, 8, 8, 4, 4, 4]


def test_evaluation_table(tiny_shards, teacher, tmp_path):
    from unmask.distill.evaluate import evaluate_run

    cfg = student_config(tiny_shards, tmp_path, "--distill.start_steps=4", "--distill.final_steps=2",
                         "--distill.steps_per_round=1", f"--distill.teacher={teacher}", "--distill.eval_samples=2",
                         "--distill.eval_length=32", "--distill.eval_teacher_steps=[16, 4]",
                         "--distill.eval_student_steps=[4]")
    from unmask.distill.loop import prepare_config
    from unmask.model.transformer import build_model

    cfg, state = prepare_config(cfg, None)
    student = build_model(cfg.model)
    student.load_state_dict(state)
    table = evaluate_run(cfg, student, tmp_path, say=lambda _: None)
    assert [(r["model"], r["steps"]) for r in table["rows"]] == [("teacher", 16), ("teacher", 4), ("student", 4)]
    assert all(r["unigram_entropy"] > 0 and r["wall_s"] > 0 for r in table["rows"])
    assert json.loads((tmp_path / "distill_eval.json").read_text())["rows"] == table["rows"]
    assert (tmp_path / "distill_eval.png").stat().st_size > 0


def test_cli_runs_and_refuses_without_teacher(tiny_shards, teacher, tmp_path, capsys):
    from tests.support.runs import tiny_cli_args
    from unmask.cli import main

    args = tiny_cli_args(tiny_shards, tmp_path, *FAST, "--train.val_batches=1", "--distill.eval=false",
                         "--distill.start_steps=4", "--distill.final_steps=2", "--distill.steps_per_round=2")
    assert main(["distill", *args]) == 2
    assert "no teacher" in capsys.readouterr().err
    assert main(["distill", *args, "--teacher", str(teacher)]) == 0
    assert (tmp_path / "checkpoints" / "step-00000002").is_dir()
