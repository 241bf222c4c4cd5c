"""Held-out likelihood: known answers for uniform models, determinism, and a standard error that means it."""

import math

import pytest
import torch

from unmask.config import DiffusionConfig, ModelConfig
from unmask.diffusion.autoregressive import Autoregressive
from unmask.diffusion.objective import MaskedDiffusion
from unmask.eval import EvalError
from unmask.eval.likelihood import evaluate_likelihood, ratio_with_stderr
from unmask.model.build import build_model

V, MASK, PAD = 50, 4, 0


class Uniform(torch.nn.Module):
    def forward(self, x, t=None):
        return torch.zeros(*x.shape, V)


def batches(n=6, B=8, L=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, V, (B, L), generator=g) for _ in range(n)]


def test_uniform_diffusion_model_bound_is_log_vocab():
    # the NELBO of a uniform model over the V-1 non-mask tokens integrates to log(V-1)
    res = evaluate_likelihood(Uniform(), MaskedDiffusion(DiffusionConfig(eps=1e-4), MASK, PAD), batches(),
                              time_samples=8)
    assert abs(res.nats_per_token - math.log(V - 1)) < 4 * res.stderr + 0.01, res
    assert res.tokens == 6 * 8 * 32 and res.sequences == 48
    assert res.perplexity_low < res.perplexity < res.perplexity_high


def test_uniform_ar_model_is_exactly_log_vocab_with_no_error():
    res = evaluate_likelihood(Uniform(), Autoregressive(PAD), batches())
    assert res.nats_per_token == pytest.approx(math.log(V), abs=1e-6)
    assert res.stderr == pytest.approx(0.0, abs=1e-9) and res.tokens == 6 * 8 * 31  # AR never scores token 1


@pytest.mark.slow  # trains or starts a process: tens of seconds on 2 loaded cores
def test_deterministic_for_a_seed_and_seed_dependent():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", vocab_size=V))
    obj = MaskedDiffusion(DiffusionConfig(), MASK, PAD)
    a, b, c = (evaluate_likelihood(model, obj, batches(3), time_samples=2, seed=s) for s in (1, 1, 2))
    assert a.nats_per_token == b.nats_per_token and a.stderr == b.stderr
    assert a.nats_per_token != c.nats_per_token
    assert abs(a.nats_per_token - c.nats_per_token) < 4 * math.hypot(a.stderr, c.stderr)


def test_padding_is_not_scored():
    x = batches(1)[0]
    x[:, 20:] = PAD
    x[0] = PAD  # an all-padding sequence is dropped, not counted as a zero-loss one
    res = evaluate_likelihood(Uniform(), Autoregressive(PAD), [x])
    assert res.sequences == 7 and res.tokens == 7 * 19


def test_ratio_stderr_matches_the_spread_of_resampled_means():
    # per-sequence NLL ~ counts * 2 + noise; the delta-method stderr should match the bootstrap spread
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(10, 50, (400,), generator=g).double()
    nll = counts * 2 + torch.randn(400, generator=g, dtype=torch.float64) * 5
    ratio, se = ratio_with_stderr(nll, counts)
    boots = []
    for _ in range(300):
        i = torch.randint(0, 400, (400,), generator=g)
        boots.append(float(nll[i].sum() / counts[i].sum()))
    assert ratio == pytest.approx(2.0, abs=4 * se)
    assert se == pytest.approx(torch.tensor(boots).std().item(), rel=0.2)


def test_no_batches_is_a_clear_error():
    with pytest.raises(EvalError, match="no batches"):
        evaluate_likelihood(Uniform(), Autoregressive(PAD), [])


class Peeking(torch.nn.Module):
    """Predicts token `right` everywhere, and puts most weight on the mask id (which scoring must never pick)."""

    def __init__(self, right, mask_weight=9.0):
        super().__init__()
        self.right, self.mask_weight = right, mask_weight

    def forward(self, x, t=None):
        logits = torch.zeros(*x.shape, V)
        logits[..., MASK] = self.mask_weight
        logits[..., self.right] = 5.0
        return logits


def test_top1_accuracy_counts_masked_predictions_and_never_the_mask_token():
    x = batches(2)
    x[0][:, :] = 7  # batch 0: every token is 7, so a model that always says 7 is right on every masked token
    obj = MaskedDiffusion(DiffusionConfig(), MASK, PAD)
    assert evaluate_likelihood(Peeking(7), obj, x[:1], time_samples=4).accuracy == 1.0
    assert evaluate_likelihood(Peeking(7), obj, x[1:], time_samples=4).accuracy < 0.1  # tokens uniform on 5..49
    ar = evaluate_likelihood(Peeking(7, mask_weight=0.0), Autoregressive(PAD), x[:1])  # AR has no mask
    assert ar.accuracy == 1.0 and ar.nats_per_byte is None
