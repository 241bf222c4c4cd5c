"""Dream's context-adaptive token-level reweighting (CART, diffusion.token_reweighting = "cart"): a training-time
weight, checked against the formula by hand; off changes nothing; validation stays the NELBO."""

import pytest
import torch
from pydantic import ValidationError

from unmask.config import Config, DiffusionConfig, ModelConfig
from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import MaskedDiffusion, cart_weights
from unmask.model.build import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK, PAD = 64, 4, 0


def objective(**kw):
    return MaskedDiffusion(DiffusionConfig(**kw), MASK, PAD, seed=3)


def tokens(B=4, L=24, seed=0):
    return torch.randint(5, V, (B, L), generator=torch.Generator().manual_seed(seed))


class Fixed(torch.nn.Module):
    """Logits depending on the input tokens (so the loss is neither 0 nor constant), no parameters."""

    def forward(self, xt, t=None):
        return torch.sin(torch.arange(V) * 0.37 + xt[..., None].float() * 0.11) * 3


def test_weights_equal_the_geometric_formula_by_hand():
    # context (visible, non-pad) at positions 0 and 3 of 5; p = 0.5: p/2 = 0.25, (1-p)^(d-1) = 0.5^(d-1).
    context = torch.tensor([[True, False, False, True, False]])
    w = cart_weights(context, 0.5)
    # i=0: d=3 to 3 -> .0625 (its own position, d=0, weighs 0); i=1: d=1 to 0, d=2 to 3 -> .25 + .125;
    # i=2: .125 + .25; i=3: d=3 to 0 -> .0625; i=4: d=4 to 0, d=1 to 3 -> .03125 + .25.
    want = torch.tensor([[0.0625, 0.375, 0.375, 0.0625, 0.28125]])
    torch.testing.assert_close(w, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("p", [0.05, 0.3, 1.0])
def test_weights_equal_dllms_dense_matrix(p):
    """The truncated convolution against dllm's cart_weight, written out as its [L, L] geometric matrix."""
    L = 300
    context = torch.rand(3, L, generator=torch.Generator().manual_seed(int(p * 100))) < 0.4
    d = (torch.arange(L)[None] - torch.arange(L)[:, None]).abs().double()
    geo = 0.5 * p * (1 - p) ** (d - 1).clamp_min(0)
    geo[d == 0] = 0
    want = (context.double() @ geo.T).float()
    torch.testing.assert_close(cart_weights(context, p), want, rtol=1e-6, atol=1e-7)
    assert float(want.max()) <= 1 + 1e-6  # never more than an unbroken context on both sides gives


def test_training_loss_uses_cart_weights_over_maskable_tokens():
    x0 = tokens()
    x0[1, -5:] = PAD
    obj = objective(token_reweighting="cart", cart_p=0.2)
    c = obj.corrupt(x0, BatchKey(step=2, global_batch=4))
    xt = c.inputs[0]
    _, masked, w, counts = c.targets
    torch.testing.assert_close(w, cart_weights((xt != MASK) & (x0 != PAD), 0.2))
    logits = Fixed()(xt)
    nll = torch.nn.functional.cross_entropy(logits[masked].masked_fill(
        torch.nn.functional.one_hot(torch.tensor(MASK), V).bool(), float("-inf")), x0[masked], reduction="none")
    want = (nll * w[masked]).sum() / counts.sum()
    torch.testing.assert_close(obj.loss_from_logits(logits, c.targets).loss, want)


@pytest.mark.parametrize("estimator", ["continuous", "exact_count"])
def test_none_leaves_the_loss_unchanged_bit_for_bit(estimator):
    x0, key = tokens(), BatchKey(step=5, global_batch=4)
    a = objective(estimator=estimator).loss(Fixed(), x0, key)
    b = objective(estimator=estimator, token_reweighting="none", cart_p=0.7).loss(Fixed(), x0, key)
    assert torch.equal(a.loss, b.loss) and a.num_tokens == b.num_tokens
    cart = objective(estimator=estimator, token_reweighting="cart").loss(Fixed(), x0, key)
    assert not torch.equal(a.loss, cart.loss)  # the option does something (the test can fail)


def test_eval_terms_are_unchanged_by_the_option():
    x0 = tokens()
    plain = objective().eval_terms(Fixed(), x0, 3, 7)
    cart = objective(token_reweighting="cart", cart_p=0.1).eval_terms(Fixed(), x0, 3, 7)
    for a, b in zip(plain, cart, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_sft_prompt_is_context_and_loss_per_answer_length():
    x0 = tokens(B=2, L=12)
    prompt = torch.zeros(2, 12, dtype=torch.bool)
    prompt[:, :5] = True
    obj = objective(token_reweighting="cart", prompt_conditioned=True)
    c = obj.corrupt(x0, BatchKey(step=1, global_batch=2), prompt_mask=prompt)
    xt, (_, masked, w, counts) = c.inputs[0], c.targets
    assert not masked[:, :5].any() and (xt[:, :5] != MASK).all()
    torch.testing.assert_close(w, cart_weights(xt != MASK, 0.3))  # the visible prompt counts as context
    assert counts.tolist() == [7, 7]


def test_a_training_step_with_cart_on_a_tiny_model_is_finite():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", vocab_size=V))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    obj = objective(token_reweighting="cart", estimator="exact_count", anneal_steps=0)
    for step in range(2):
        out = obj.loss(model, tokens(B=2, L=32, seed=step), BatchKey(step=step, global_batch=2))
        assert torch.isfinite(out.loss) and out.loss > 0
        opt.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()


@pytest.mark.parametrize("other", ["bd3lm", "ar"])
def test_cart_outside_masked_diffusion_is_refused_by_name(other):
    with pytest.raises(ValidationError, match="diffusion.token_reweighting"):
        DiffusionConfig(objective=other, token_reweighting="cart")
    with pytest.raises(ValidationError, match="diffusion.token_reweighting"):
        Config.model_validate({"diffusion": {"objective": other, "token_reweighting": "cart"}})


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
def test_cart_p_outside_zero_one_is_refused(p):
    with pytest.raises(ValidationError, match="cart_p"):
        DiffusionConfig(token_reweighting="cart", cart_p=p)


def test_distill_refuses_cart_by_name(tmp_path):
    """A distill run takes its teacher's [diffusion] and weighs no tokens: the key would do nothing."""
    from unmask.distill.stage import prepare_config
    from unmask.errors import ConfigError

    cfg = Config.model_validate({"train": {"seq_len": 32}, "diffusion": {"token_reweighting": "cart"}})
    with pytest.raises(ConfigError, match=r"diffusion.token_reweighting='cart' .*remove diffusion.token_reweighting"):
        prepare_config(cfg, str(tmp_path / "teacher"))
