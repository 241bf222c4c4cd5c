"""The distillation objectives on a tiny real model: the targets, the divergences, determinism and gradients."""

from __future__ import annotations

import pytest
import torch

from unmask.config import DiffusionConfig, DistillConfig, ModelConfig
from unmask.diffusion.noise import BatchKey, mix
from unmask.diffusion.objective import MaskedDiffusion
from unmask.distill.objective import SDTT, TOKEN_STREAM, MaskedConsistency, divergence, frozen_copy
from unmask.model.build import build_model

MASK, PAD, V = 4, 0, 64


def setup(objective=SDTT, steps: int = 4, **distill):
    torch.manual_seed(0)
    # A large init makes predictions depend on context, so revealing tokens changes them.
    model = build_model(ModelConfig(size="tiny", vocab_size=V, init_std=0.5))
    cfg = DistillConfig(start_steps=steps, final_steps=steps // 2, **distill)
    obj = objective(cfg, MaskedDiffusion(DiffusionConfig(), MASK, PAD, seed=3), frozen_copy(model, cfg.teacher_dtype))
    x0 = torch.randint(5, V, (8, 32), generator=torch.Generator().manual_seed(1))
    return model, obj, x0


def masked_target(obj, model, x0, key):
    c = obj.diffusion.corrupt(x0, key)
    t = obj.diffusion.times(key, x0.shape[0])
    with torch.no_grad():
        return obj.target(model, c.inputs[0], t, key), c.targets[1]


@pytest.mark.parametrize("objective", [SDTT, MaskedConsistency])
def test_target_is_a_distribution_at_every_masked_position(objective):
    model, obj, x0 = setup(objective)
    log_target, masked = masked_target(obj, model, x0, BatchKey(0, global_batch=8))
    probs = log_target.exp()  # [N, V]
    assert masked.any() and probs.shape[0] == masked.sum()
    assert not log_target.isnan().any()
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]), atol=1e-5, rtol=0)
    assert (probs[:, MASK] == 0).all()  # SUBS: <mask> is never a target


def test_teacher_initialised_student_is_close_but_two_steps_differ_from_one():
    model, obj, x0 = setup(steps=2)
    key = BatchKey(0, global_batch=8)
    coarse = obj.loss(model, x0, key).loss.item()  # teacher steps of 1/2: the first reveals many tokens
    obj.steps = 1024  # steps of 1/1024: almost nothing is revealed between the two
    fine = obj.loss(model, x0, key).loss.item()
    print(coarse, fine)
    assert coarse > 0.01  # two teacher steps are not one: newly revealed context moves the prediction
    assert fine < coarse / 10


def test_loss_is_deterministic_in_the_key_and_trains_only_the_student():
    model, obj, x0 = setup()
    a = obj.loss(model, x0, BatchKey(5, global_batch=8))
    b = obj.loss(model, x0, BatchKey(5, global_batch=8))
    c = obj.loss(model, x0, BatchKey(6, global_batch=8))
    assert a.loss.item() == b.loss.item() != c.loss.item()
    a.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_rounds_halve_steps_and_replace_the_teacher():
    model, obj, _ = setup(steps=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    obj.set_round(2)
    assert obj.steps == 4
    obj.replace_teacher(model.state_dict())
    for (name, p), q in zip(model.state_dict().items(), obj.teacher.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    key = "tok_embeddings.weight"
    assert obj.teacher.state_dict()[key].data_ptr() != model.state_dict()[key].data_ptr()  # a copy, not a view


def test_divergences():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 10, generator=g).log_softmax(-1)
    q = torch.randn(6, 10, generator=g).log_softmax(-1)
    for kind in ("kl", "reverse_kl", "tvd"):
        torch.testing.assert_close(divergence(p, p, kind), torch.zeros(6), atol=1e-6, rtol=0)
        assert (divergence(p, q, kind) > 0).all()
    torch.testing.assert_close(divergence(p, q, "reverse_kl"), divergence(q, p, "kl"))
    assert (divergence(p, q, "tvd") <= 1).all()
    manual = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(divergence(p, q, "kl"), manual)
    # A zero-probability column (SUBS' <mask>) contributes nothing instead of nan.
    p0, q0 = p.clone(), q.clone()
    p0[:, 0] = q0[:, 0] = float("-inf")
    assert torch.isfinite(divergence(p0, q0, "kl")).all() and torch.isfinite(divergence(p0, q0, "reverse_kl")).all()


def test_bf16_teacher_runs():
    model, obj, x0 = setup(teacher_dtype="bf16")
    assert next(obj.teacher.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(obj.loss(model, x0, BatchKey(0, global_batch=8)).loss)


def test_teacher_draws_tokens_with_float64_uniforms():
    # Like the samplers (float64 Gumbel noise): float32 uniforms come in steps of 2^-24 and miss rare tokens.
    model, obj, x0 = setup()
    B, L = x0.shape
    key = BatchKey(2, global_batch=B)
    xt = obj.diffusion.corrupt(x0, key).inputs[0]
    t = obj.diffusion.times(key, B)
    xs, revealed, log_p = obj.teacher_step(xt, t, (t - 0.5).clamp_min(0), key, stream=1)
    seed = mix(obj.seed, TOKEN_STREAM, 1)
    v = torch.stack([torch.rand(L, dtype=torch.float64, generator=torch.Generator().manual_seed(mix(seed, 2, i)))
                     for i in range(B)])[xt == MASK]  # [N], the token stream drawn in float64
    assert (v.float().double() != v).any()  # finer than float32
    cdf = log_p.double().exp().cumsum(-1)
    expected = torch.searchsorted(cdf, (v * cdf[:, -1])[:, None])[:, 0]
    assert revealed.sum() > 20
    assert torch.equal(xs[revealed], expected[revealed[xt == MASK]])


def test_fp32_teacher_computes_in_fp32_inside_a_bf16_training_step():
    model, obj, x0 = setup()  # teacher_dtype="fp32"
    key = BatchKey(0, global_batch=8)
    xt = obj.diffusion.corrupt(x0, key).inputs[0]
    t, masked = obj.diffusion.times(key, 8), xt == MASK
    plain = obj.predict(obj.teacher, xt, t, masked, "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the engine's region when train.dtype="bf16"
        inside = obj.predict(obj.teacher, xt, t, masked, obj.cfg.teacher_dtype)
        student = obj.predict(model, xt, t, masked)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, atol=0, rtol=0)
    assert not torch.equal(student, plain)  # the student (same weights) still trains in the engine's bf16
