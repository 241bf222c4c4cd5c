"""`unmask distill` end to end on a tiny teacher trained in-process: the loss falls, a resume mid-round is exact,
a round boundary hands the student's weights to the teacher, and the evaluation table is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.distill import checkpoint, same
from tests.support.runs import metrics, tiny_config, train_losses
from unmask.distill.objective import SDTT
from unmask.distill.stage import distill, prepare_config
from unmask.launcher.env import REQUEUE_EXIT_CODE
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


def test_distillation_loss_falls(tiny_shards, teacher, tmp_path):
    # One round 8 -> 4 steps: coarse steps give the student a clear gap to close.
    cfg = student_config(tiny_shards, tmp_path, "--distill.start_steps=8", "--distill.final_steps=4",
                         "--distill.steps_per_round=30", "--optim.lr=3e-3")
    distill(cfg, teacher=str(teacher))
    losses = list(train_losses(tmp_path).values())
    assert len(losses) == 30
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_sigterm_mid_round_saves_exits_3_and_resumes_exactly(tiny_shards, teacher, tmp_path, monkeypatch,
                                                               own_signal_handlers):
    args = ("--distill.start_steps=8", "--distill.final_steps=2", "--distill.steps_per_round=4")
    distill(student_config(tiny_shards, tmp_path / "full", *args), teacher=str(teacher))
    monkeypatch.setenv("UNMASK_FAULTS", "step.end@6=term")  # SIGTERM at the end of step 6, in round 1
    with pytest.raises(SystemExit) as preempted:
        distill(student_config(tiny_shards, tmp_path / "split", *args), teacher=str(teacher))
    assert preempted.value.code == REQUEUE_EXIT_CODE
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    monkeypatch.delenv("UNMASK_FAULTS")
    distill(student_config(tiny_shards, tmp_path / "split", *args), teacher=str(teacher))
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert list(full) == list(range(1, 9))
    assert full == split
    meta_full, student_full, teacher_full = checkpoint(tmp_path / "full", 8)
    meta_split, student_split, teacher_split = checkpoint(tmp_path / "split", 8)
    assert same(student_full, student_split) and same(teacher_full, teacher_split)
    assert (meta_split["round"], meta_split["teacher_steps"]) == (1, 4)


def test_non_finite_steps_roll_back_teacher_and_round_too(tiny_shards, teacher, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = SDTT.loss

    def loss(self, model, x0, key, prompt_mask=None):  # 0-based steps 2 and 3 fail the first time only
        out = original(self, model, x0, key, prompt_mask)
        if key.step in (2, 3) and calls["n"] < 2:
            calls["n"] += 1
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(SDTT, "loss", loss)
    cfg = student_config(tiny_shards, tmp_path, "--distill.start_steps=8", "--distill.final_steps=2",
                         "--distill.steps_per_round=3", "--checkpoint.interval_steps=2",
                         "--checkpoint.max_bad_steps=2", "--checkpoint.rollback_lr_scale=0.5")
    distill(cfg, teacher=str(teacher))
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    # Step 3 is skipped and ends round 0; step 4 is the second bad step in a row: back to the step-2 checkpoint,
    # whose round (0) and teacher come back with it, so step 3 runs again with the round-0 teacher.
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6]
    assert [r["teacher_steps"] for r in rows] == [8, 8, 8, 8, 4, 4, 4]
    assert rows[-1]["skipped_steps"] == 2 and rows[-1]["lr"] == pytest.approx(0.5 * rows[0]["lr"])


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
                         "--distill.eval_student_steps=[4]", "--distill.eval_seeds=[0, 1]")
    from unmask.model.build import build_model

    cfg, state = prepare_config(cfg, None)
    student = build_model(cfg.model)
    student.load_state_dict(state)
    said = []
    table = evaluate_run(cfg, student, tmp_path, say=said.append)
    assert [(r["model"], r["steps"]) for r in table["rows"]] == [("teacher", 16), ("teacher", 4), ("student", 4)]
    printed = said[-1].splitlines()  # the table, as `unmask distill` prints it last
    assert printed[1].split() == ["model", "steps", "gen", "ppl", "(mean", "+-", "sd)", "entropy", "wall", "s"]
    assert [line.split()[:2] for line in printed[2:]] == [["teacher", "16"], ["teacher", "4"], ["student", "4"]]
    assert all(r["unigram_entropy"] > 0 and r["wall_s"] > 0 for r in table["rows"])
    for r in table["rows"]:  # two sample sets (seeds 0, 1): their mean and spread, each set kept
        sets = r["unigram_entropy_sets"]
        assert len(sets) == 2 and sets[0] != sets[1] and r["unigram_entropy"] == pytest.approx(sum(sets) / 2)
        assert r["unigram_entropy_sd"] == pytest.approx(abs(sets[0] - sets[1]) / 2 ** 0.5)
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


def test_teacher_trained_by_exact_count_distills_from_times(tiny_shards, tmp_path):
    """A count-based corruption has no time t to run the teacher's reverse step from: distillation corrupts by time."""
    run = tmp_path / "teacher"
    train(tiny_config(tiny_shards, run, *FAST, "--train.steps=2", "--train.val_batches=1",
                      "--diffusion.estimator=exact_count"))
    cfg, _ = prepare_config(student_config(tiny_shards, tmp_path / "student"), str(run))
    assert cfg.diffusion.estimator == "continuous"


def test_a_teacher_adapted_from_a_causal_lm_distills_with_its_shifted_head(tiny_shards, tmp_path):
    """A Dream/DiffuLLaMA-style teacher (shift_logits, stopped mid-anneal) distils: teacher and student keep the
    shifted head, the annealing is not carried over (both attend fully), and the student trains and samples."""
    from unmask.checkpoint.consolidate import load_checkpoint_weights
    from unmask.distill.stage import Distill

    run = tmp_path / "teacher"
    train(tiny_config(tiny_shards, run, *FAST, "--train.steps=3", "--train.val_batches=1", "--model.shift_logits=true",
                      "--diffusion.anneal_steps=8"))
    cfg = student_config(tiny_shards, tmp_path / "student", "--distill.start_steps=4", "--distill.final_steps=2",
                         "--distill.steps_per_round=3", "--distill.eval=true", "--distill.eval_samples=2",
                         "--distill.eval_length=32", "--distill.eval_teacher_steps=[4]",
                         "--distill.eval_student_steps=[2]", "--distill.eval_block_length=16")  # as the demo's table
    stage = Distill(str(run))
    train(cfg, stage=stage)
    assert stage.objective.teacher.shift_logits
    losses = train_losses(tmp_path / "student")
    assert sorted(losses) == [1, 2, 3] and all(0 < v < float("inf") for v in losses.values())
    saved, _ = load_checkpoint_weights(tmp_path / "student")
    assert saved.model.shift_logits and saved.diffusion.anneal_steps == 0
    rows = json.loads((tmp_path / "student" / "distill_eval.json").read_text())["rows"]
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher", 4), ("student", 2)]
    assert all(r["unigram_entropy"] > 0 for r in rows)
