"""`unmask distill` with Duo's DCD (distill.objective = "dcd") on a tiny uniform-state teacher trained in-process:
the loss falls, a resume mid-round is exact, the round boundary refreshes the teacher, and each objective refuses
the other kind of teacher.

The teacher is trained by `unmask train` with diffusion.objective = "duo" (with a short curriculum, which the
student's config drops)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.distill import checkpoint, same
from tests.support.runs import metrics, tiny_config, train_losses
from unmask.distill.stage import distill, prepare_config
from unmask.errors import ConfigError
from unmask.launcher.env import REQUEUE_EXIT_CODE
from unmask.train.loop import train

FAST = ("--train.threads=1", "--train.micro_batch_size=4", "--train.val_every=0", "--train.log_every=1",
        "--optim.warmup_steps=0", "--optim.decay=constant", "--model.time_conditioning=true")


@pytest.fixture(scope="module")
def duo_teacher(tiny_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("duo_teacher")
    train(tiny_config(tiny_shards, run, *FAST, "--diffusion.objective=duo", "--train.steps=30",
                      "--train.val_batches=1", "--diffusion.curriculum_end=10"))
    return run


def student_config(shards, run, *overrides):
    return tiny_config(shards, run, *FAST, "--train.val_batches=1", "--distill.objective=dcd",
                       "--distill.eval=false", "--checkpoint.interval_steps=0", *overrides)


def test_dcd_loss_falls(tiny_shards, duo_teacher, tmp_path):
    # One round with teacher steps of 1/8: the student at t learns the teacher's prediction at t - 1/8.
    cfg = student_config(tiny_shards, tmp_path, "--distill.start_steps=8", "--distill.final_steps=4",
                         "--distill.steps_per_round=30", "--optim.lr=3e-3")
    assert prepare_config(cfg, str(duo_teacher))[0].distill.divergence_kind == "reverse_kl"  # Duo's kl-bwd
    distill(cfg, teacher=str(duo_teacher))
    losses = list(train_losses(tmp_path).values())
    assert len(losses) == 30 and all(v > 0 for v in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_dcd_resumes_mid_round_exactly_and_refreshes_the_teacher_at_round_boundaries(
        tiny_shards, duo_teacher, tmp_path, monkeypatch, own_signal_handlers):
    args = ("--distill.start_steps=8", "--distill.final_steps=2", "--distill.steps_per_round=3",
            "--checkpoint.interval_steps=1", "--checkpoint.keep_last=9")
    distill(student_config(tiny_shards, tmp_path / "full", *args), teacher=str(duo_teacher))
    monkeypatch.setenv("UNMASK_FAULTS", "step.end@4=term")  # SIGTERM at the end of step 4, in round 1
    with pytest.raises(SystemExit) as preempted:
        distill(student_config(tiny_shards, tmp_path / "split", *args), teacher=str(duo_teacher))
    assert preempted.value.code == REQUEUE_EXIT_CODE
    monkeypatch.delenv("UNMASK_FAULTS")
    distill(student_config(tiny_shards, tmp_path / "split", *args), teacher=str(duo_teacher))
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert list(full) == list(range(1, 7)) and full == split
    # Duo's hard refresh every update_teacher_every (= steps_per_round) steps: the teacher is the step-3 student
    # from step 3 on, the original before; dt doubles (teacher steps 8 -> 4).
    from unmask.checkpoint.consolidate import load_checkpoint_weights

    _, original = load_checkpoint_weights(duo_teacher)
    meta2, _, teacher2 = checkpoint(tmp_path / "full", 2)
    meta3, student3, teacher3 = checkpoint(tmp_path / "full", 3)
    meta6, student6, teacher6 = checkpoint(tmp_path / "full", 6)
    assert same(teacher2, original) and (meta2["round"], meta2["teacher_steps"]) == (0, 8)
    assert not same(student3, original) and same(teacher3, student3) and meta3["teacher_steps"] == 4
    assert same(teacher6, student3) and not same(student6, student3)
    _, split_student6, split_teacher6 = checkpoint(tmp_path / "split", 6)
    assert same(student6, split_student6) and same(teacher6, split_teacher6)
    rounds = {r["step"]: r["teacher_steps"] for r in metrics(tmp_path / "full") if "loss" in r}
    assert [rounds[s] for s in range(1, 7)] == [8, 8, 8, 4, 4, 4]


def test_each_objective_refuses_the_other_kind_of_teacher(tiny_shards, duo_teacher, tmp_path):
    mdlm = tmp_path / "mdlm"
    train(tiny_config(tiny_shards, mdlm, *FAST, "--train.steps=1", "--train.val_batches=1"))
    with pytest.raises(ConfigError, match="'mdlm' model; distill.objective='dcd' needs a 'duo' teacher"):
        prepare_config(student_config(tiny_shards, tmp_path / "a"), str(mdlm))
    for objective in ("sdtt", "masked_consistency"):
        with pytest.raises(ConfigError, match=f"'duo' model; distill.objective='{objective}'.*set distill.objective "
                                              "to 'dcd'"):
            prepare_config(student_config(tiny_shards, tmp_path / "b", f"--distill.objective={objective}"),
                           str(duo_teacher))


def test_dcd_evaluation_table_samples_with_the_uniform_state_sampler(tiny_shards, duo_teacher, tmp_path):
    """The table samples a duo teacher and its student with the uniform-state sampler (its NFE is steps + 1: the
    greedy tail is one more network call; a masked ancestral row takes at most `steps`)."""
    from unmask.distill.evaluate import evaluate_run
    from unmask.model.build import build_model

    cfg = student_config(tiny_shards, tmp_path, "--distill.start_steps=4", "--distill.final_steps=2",
                         "--distill.steps_per_round=1", f"--distill.teacher={duo_teacher}",
                         "--distill.eval_samples=2", "--distill.eval_length=32", "--distill.eval_teacher_steps=[8]",
                         "--distill.eval_student_steps=[4]", "--distill.eval_seeds=[0]")
    cfg, state = prepare_config(cfg, None)
    student = build_model(cfg.model)
    student.load_state_dict(state)
    table = evaluate_run(cfg, student, tmp_path, say=lambda _: None)
    assert [(r["model"], r["steps"], r["nfe"]) for r in table["rows"]] == [("teacher", 8, 9), ("student", 4, 5)]
    assert all(r["unigram_entropy"] > 0 for r in table["rows"])
