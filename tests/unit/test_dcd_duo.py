"""Duo's discrete consistency distillation (DuoDCD) on a tiny time-conditioned model: one deterministic trajectory
through the Gaussian latent, the teacher's prediction at (x_s, s) as the target, Duo's dt schedule and teacher
refresh through the stage's rounds, and kl-bwd by hand."""

from __future__ import annotations

import math

import pytest
import torch

from unmask.config import Config, DiffusionConfig, DistillConfig, ModelConfig, load_config_text
from unmask.core.uniform_state import gaussian_scales, gaussian_to_uniform, time_of
from unmask.diffusion.noise import BatchKey, mix, per_sample_normals
from unmask.diffusion.objective import build_objective
from unmask.distill import objective as distill_objective
from unmask.distill.objective import LATENT_STREAM, DuoDCD, divergence, frozen_copy
from unmask.distill.stage import Distill, check_teacher
from unmask.errors import ConfigError
from unmask.model.build import build_model

MASK, PAD, V, B, L = 4, 0, 64, 8, 32


def setup(start: int = 4, final: int = 2, **distill):
    torch.manual_seed(0)
    # A large init makes predictions depend on the input, so x_t and x_s give different predictions.
    model = build_model(ModelConfig(size="tiny", vocab_size=V, init_std=0.5, time_conditioning=True))
    cfg = DistillConfig(objective="dcd", start_steps=start, final_steps=final, **distill)
    diffusion = build_objective(DiffusionConfig(objective="duo"), MASK, PAD, seed=3, time_conditioned=True,
                                vocab_size=V)
    obj = DuoDCD(cfg, diffusion, frozen_copy(model, cfg.teacher_dtype))
    x0 = torch.randint(5, V, (B, L), generator=torch.Generator().manual_seed(1))
    x0[:, -3:] = PAD  # padded tails: kept in x_t and x_s, never scored
    return model, obj, x0


def path(obj, x0, key):
    t, s = obj.times(key, B)
    return (t, s, *obj.trajectory(x0, obj.gamma(t), obj.gamma(s), key, V))


def perturb(model, scale=0.05, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_trajectory_is_deterministic_in_the_key():
    _, obj, x0 = setup()
    key = BatchKey(5, global_batch=B)
    t, s, xt, xs = path(obj, x0, key)
    t2, s2, xt2, xs2 = path(obj, x0, key)
    assert torch.equal(t, t2) and torch.equal(s, s2) and torch.equal(xt, xt2) and torch.equal(xs, xs2)
    _, _, xt3, xs3 = path(obj, x0, BatchKey(6, global_batch=B))
    assert not torch.equal(xt, xt3) and not torch.equal(xs, xs3)
    pad = x0 == PAD
    assert torch.equal(xt[pad], x0[pad]) and torch.equal(xs[pad], x0[pad])


def test_x_t_and_x_s_are_argmaxes_of_one_gaussian_latent():
    _, obj, x0 = setup()
    key = BatchKey(2, global_batch=B)
    t, s, xt, xs = path(obj, x0, key)
    eps = per_sample_normals(mix(obj.seed, LATENT_STREAM), key, B, (L, V))  # the latent, drawn again
    onehot = torch.nn.functional.one_hot(x0, V).float()

    def direct(time):  # Duo's _sample_trajectory: argmax(a_g onehot(x0) + s_g eps), pads kept
        a_g, s_g = (v.float()[:, None, None] for v in gaussian_scales(obj.gamma(time)))
        return torch.where(x0 == PAD, x0, (a_g * onehot + s_g * eps).argmax(-1))

    assert torch.equal(xt, direct(t)) and torch.equal(xs, direct(s))
    assert (xt != x0).float().mean() > 0.3  # t is noisy enough for the test to mean something


def test_x_s_is_x_t_further_denoised_and_coincides_as_dt_vanishes():
    _, obj, x0 = setup(start=4)  # dt = 1/4
    key = BatchKey(3, global_batch=B)
    _, _, xt, xs = path(obj, x0, key)
    # One latent: a token clean at t is clean at s (less noise), and x_s is clean more often.
    assert ((xt == x0) <= (xs == x0)).all()
    assert (xs == x0).float().mean() > (xt == x0).float().mean() + 0.05
    obj.steps = 2**24  # dt -> 0
    t, s, xt, xs = path(obj, x0, key)
    assert (t - s).max() < 1e-6 and torch.equal(xt, xs)


def test_times_follow_duo_and_dt_doubles_each_round():
    _, obj, _ = setup(start=64, final=4)
    key = BatchKey(0, global_batch=B)
    base = obj.diffusion.times(key, B).double()
    for n in range(obj.cfg.rounds):
        obj.set_round(n)
        assert obj.dt == 2**n / 64  # Duo's _compute_dt, T = start_steps
        t, s = obj.times(key, B)
        torch.testing.assert_close(t, (base + obj.dt).clamp(0, 1))
        torch.testing.assert_close(t - s, torch.full((B,), obj.dt, dtype=torch.float64))
        assert (s >= 0).all() and (t <= 1).all()


def captured_target(monkeypatch, obj, model, x0, key):
    """(the target divergence() received, the loss)."""
    seen = {}

    def spy(log_p, log_q, kind):
        seen["target"], seen["student"] = log_p, log_q
        return divergence(log_p, log_q, kind)

    monkeypatch.setattr(distill_objective, "divergence", spy)
    out = obj.loss(model, x0, key)
    return seen["target"], seen["student"], out


def test_target_is_the_teacher_at_x_s_and_s_and_only_the_student_trains(monkeypatch):
    model, obj, x0 = setup()
    key = BatchKey(4, global_batch=B)
    perturb(obj.teacher, 0.2, seed=5)  # adaLN starts at zero: make the time matter
    perturb(model)  # the student differs from the teacher
    target, student, out = captured_target(monkeypatch, obj, model, x0, key)
    # 1. By hand: the teacher at (x_s, time_of(alpha_s)), the student at (x_t, time_of(alpha_t)), non-pad tokens.
    t, s, xt, xs = path(obj, x0, key)
    alpha_t, alpha_s = gaussian_to_uniform(obj.gamma(t), V)[0], gaussian_to_uniform(obj.gamma(s), V)[0]
    scored = x0 != PAD
    with torch.no_grad():
        expected = obj.teacher(xs, time_of(alpha_s).float())[scored].log_softmax(-1)
        at_xt = obj.teacher(xt, time_of(alpha_s).float())[scored].log_softmax(-1)
        at_t = obj.teacher(xs, time_of(alpha_t).float())[scored].log_softmax(-1)
        at_raw_s = obj.teacher(xs, s.float())[scored].log_softmax(-1)
        expected_student = model(xt, time_of(alpha_t).float())[scored].log_softmax(-1)
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(student.detach(), expected_student)
    for wrong in (at_xt, at_t, at_raw_s):  # x_s, at s, read through alpha_s: the check tells each apart
        assert not torch.allclose(expected, wrong, atol=1e-3)
    assert torch.isfinite(target).all() and (target[:, MASK] > -30).all()  # full vocabulary: nothing suppressed
    assert out.num_tokens == int(scored.sum())
    # 2. Gradients reach the student only.
    assert not target.requires_grad
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # 3. The student's weights do not move the target; the teacher's do.
    other_student = build_model(model.cfg)
    again, _, _ = captured_target(monkeypatch, obj, other_student, x0, key)
    assert torch.equal(again, target)
    perturb(obj.teacher, seed=8)
    swapped, _, _ = captured_target(monkeypatch, obj, model, x0, key)
    assert not torch.allclose(swapped, target, atol=1e-3)


def test_kl_bwd_is_the_default_and_matches_a_hand_computation():
    assert DistillConfig(objective="dcd", start_steps=4, final_steps=2).divergence_kind == "reverse_kl"
    assert DistillConfig(objective="sdtt", start_steps=4, final_steps=2).divergence_kind == "kl"
    assert DistillConfig(objective="dcd", start_steps=4, final_steps=2, divergence="kl").divergence_kind == "kl"
    # Student q = (1/3, 2/3), teacher p = (1/2, 1/2): KL(q || p) = 1/3 ln(2/3) + 2/3 ln(4/3) (Duo's kl-bwd).
    log_q = torch.tensor([[0.0, math.log(2.0)]]).log_softmax(-1)
    log_p = torch.tensor([[0.0, 0.0]]).log_softmax(-1)
    kl_bwd = 1 / 3 * math.log(2 / 3) + 2 / 3 * math.log(4 / 3)
    kl_fwd = 1 / 2 * math.log(3 / 2) + 1 / 2 * math.log(3 / 4)
    torch.testing.assert_close(divergence(log_p, log_q, "reverse_kl"), torch.tensor([kl_bwd]))
    torch.testing.assert_close(divergence(log_p, log_q, "kl"), torch.tensor([kl_fwd]))
    # The objective reads it: kl-fwd gives another loss on the same trajectory.
    model, obj, x0 = setup()
    perturb(model)
    key = BatchKey(1, global_batch=B)
    bwd = obj.loss(model, x0, key).loss
    obj.cfg = obj.cfg.model_copy(update={"divergence": "kl"})
    assert not torch.isclose(obj.loss(model, x0, key).loss, bwd)


def test_stage_rounds_refresh_the_teacher_on_schedule_and_resume_exactly():
    model, obj, x0 = setup(start=16, final=2)  # 3 rounds of 3 steps
    cfg = Config(distill=obj.cfg.model_copy(update={"steps_per_round": 3}))
    cfg.train.steps = cfg.distill.rounds * cfg.distill.steps_per_round
    stage = Distill()
    stage.cfg, stage.objective = cfg, obj

    class Engine:
        pass

    engine = Engine()
    engine.model = model
    original = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    for step in range(1, cfg.train.steps + 1):
        perturb(model, 0.01, seed=step)  # an optimizer step
        stage.after_step(step, engine, say=lambda _: None)
        teacher, student = obj.teacher.state_dict(), model.state_dict()
        refreshed = all(torch.equal(teacher[k], student[k]) for k in student)
        at_boundary = step % 3 == 0 and step < cfg.train.steps
        assert refreshed == at_boundary, step
        if step < 3:
            assert all(torch.equal(teacher[k], original[k]) for k in original)
        assert obj.dt == 2 ** stage.round / 16 and stage.round == min(step // 3, cfg.distill.rounds - 1)
    # A resume mid-round: a fresh objective given the saved round and teacher computes the same loss.
    saved = {k: v.clone() for k, v in stage.state_dict()["teacher"].items()}
    key = BatchKey(9, global_batch=B)
    before = obj.loss(model, x0, key).loss
    _, fresh, _ = setup(start=16, final=2)
    resumed = Distill()
    resumed.objective = fresh
    resumed.load_state_dict({"round": stage.round, "teacher": saved})
    assert fresh.dt == obj.dt
    assert torch.equal(fresh.loss(model, x0, key).loss, before)


def test_teacher_runs_in_its_own_dtype_inside_a_bf16_training_step():
    model, obj, x0 = setup()
    key = BatchKey(0, global_batch=B)
    t, s, xt, xs = path(obj, x0, key)
    time, scored = time_of(gaussian_to_uniform(obj.gamma(s), V)[0]), x0 != PAD
    plain = obj.predict(obj.teacher, xs, time, scored, "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the engine's region when train.dtype="bf16"
        inside = obj.predict(obj.teacher, xs, time, scored, obj.cfg.teacher_dtype)
        student = obj.predict(model, xs, time, scored)
    torch.testing.assert_close(inside, plain, atol=0, rtol=0)
    assert not torch.equal(student, plain)  # the student (same weights) trains in the engine's bf16
    _, bf16, _ = setup(teacher_dtype="bf16")
    assert next(bf16.teacher.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(bf16.loss(model, x0, key).loss)


def test_gamma_range_is_checked_and_survives_a_saved_config():
    with pytest.raises(ValueError, match="dcd_gamma"):
        DistillConfig(objective="dcd", start_steps=4, final_steps=2, dcd_gamma=[-1.0, -4.0])
    cfg = Config.model_validate({"distill": {"objective": "dcd", "start_steps": 8, "final_steps": 2,
                                             "dcd_gamma": [-5.0, -0.5]}})
    assert load_config_text(cfg.to_toml(), "test").distill.dcd_gamma == [-5.0, -0.5]


def test_each_objective_refuses_the_other_kind_of_teacher():
    check_teacher("dcd", "duo", "run")
    check_teacher("sdtt", "mdlm", "run")
    check_teacher("masked_consistency", "mdlm", "run")
    with pytest.raises(ConfigError, match="'mdlm'.*needs a 'duo' teacher.*'sdtt' or 'masked_consistency'"):
        check_teacher("dcd", "mdlm", "run")
    with pytest.raises(ConfigError, match="'duo'.*needs a 'mdlm' teacher.*'dcd'"):
        check_teacher("sdtt", "duo", "run")
    with pytest.raises(ConfigError, match="'bd3lm'.*mdlm.*duo"):
        check_teacher("masked_consistency", "bd3lm", "run")
