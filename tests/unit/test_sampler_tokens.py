"""Token choice (temperature, top-k, top-p, float64 Gumbel-max), confidence order and stopping at <eos>,
against hand-made models whose answer is known."""

import math

import pytest
import torch

from unmask.core.sampling_steps import choose_tokens, filter_logits, guide
from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig, sample
from unmask.diffusion.sampler_template import prompt_template

SP = SpecialTokens()


def draw(logits, n=40000, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    tokens, _ = choose_tokens(logits.double().expand(n, -1), generator=g, **kw)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / n


def close(freq, probs, n=40000):
    sigma = (probs * (1 - probs) / n).sqrt()
    return bool(((freq - probs).abs() <= 5 * sigma + 1e-12).all())


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_gumbel_max_samples_the_tempered_softmax(temperature):
    freq = draw(LOGITS, temperature=temperature, top_k=0, top_p=1.0)
    assert close(freq, (LOGITS[0].double() / temperature).softmax(-1))


@pytest.mark.parametrize("knobs", [dict(temperature=0.5, top_k=0, top_p=1.0), dict(temperature=1.0, top_k=1, top_p=1.0),
                                   dict(temperature=2.0, top_k=0, top_p=0.5), dict(temperature=0, top_k=0, top_p=1.0)])
def test_confidence_is_the_models_own_probability_of_the_token(knobs):
    # LLaDA ranks remasking by the raw softmax: under top_k=1 the filtered distribution would give every token
    # probability 1 and make the ranking meaningless.
    logits = torch.randn(64, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tokens, confidence = choose_tokens(logits, generator=torch.Generator().manual_seed(0), **knobs)
    torch.testing.assert_close(confidence, logits.softmax(-1).gather(-1, tokens[:, None])[:, 0], rtol=0, atol=0)


def test_top_k_and_top_p_renormalise_the_kept_tokens():
    probs = LOGITS[0].double().softmax(-1)  # 0.56, 0.21, 0.13, 0.08, 0.03, 0.004
    freq = draw(LOGITS, temperature=1.0, top_k=2, top_p=1.0)
    assert close(freq, torch.cat([probs[:2] / probs[:2].sum(), torch.zeros(4, dtype=torch.float64)]))
    # top_p = 0.8: 0.56 + 0.21 = 0.77 < 0.8, so the third token is needed too
    freq = draw(LOGITS, temperature=1.0, top_k=0, top_p=0.8)
    assert close(freq, torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(3, dtype=torch.float64)]))


def test_greedy_limits():
    for kw in (dict(temperature=0.0, top_k=0, top_p=1.0), dict(temperature=1.0, top_k=1, top_p=1.0),
               dict(temperature=1.0, top_k=0, top_p=1e-6)):
        assert draw(LOGITS, n=100, **kw)[0] == 1.0


def test_filter_keeps_at_least_the_best_token_and_guide_at_zero_is_exact():
    logits = torch.randn(5, 30, dtype=torch.float64)
    kept = filter_logits(logits, top_k=0, top_p=1e-9)
    assert torch.equal(kept.isfinite().sum(-1), torch.ones(5, dtype=torch.long))
    cond, uncond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    assert torch.equal(guide(cond, uncond, 0.0), cond)
    assert torch.allclose(guide(cond, uncond, 2.0), uncond + 3 * (cond - uncond), atol=1e-5)


class Peaked(torch.nn.Module):
    """Predicts token 50 + position everywhere; the peak grows with the position, so later positions are
    more confident. The <mask> id gets the largest logit of all, which SUBS must ignore."""

    def forward(self, x, t=None):
        B, L = x.shape
        logits = torch.zeros(B, L, 200)
        pos = torch.arange(L)
        logits[:, pos, 50 + pos] = 1.0 + pos.float()
        logits[..., SP.mask] = 100.0
        return logits


def test_low_confidence_remasking_commits_the_most_confident_first():
    template, _ = prompt_template([[7]], 10, SP)  # <bos> 7 then 8 masks
    order = []

    class Spy(Peaked):
        def forward(self, x, t=None):
            order.append((x[0] == SP.mask).nonzero()[:, 0].tolist())
            return super().forward(x, t)

    out = sample(Spy(), template, SamplerConfig(kind="remask", steps=8, temperature=0.0), SP)
    assert out.tokens[0, 2:].tolist() == [50 + i for i in range(2, 10)]
    # one commit per step, from the last (most confident) position back to the first
    assert [masks[-1] for masks in order] == list(range(9, 1, -1))


class EndsAt(torch.nn.Module):
    """Greedy text: token 60 until position end[b], <eos> there, token 61 after."""

    def __init__(self, ends):
        super().__init__()
        self.ends = torch.tensor(ends)

    def forward(self, x, t=None):
        B, L = x.shape
        pos = torch.arange(L)[None]
        target = torch.where(pos < self.ends[:, None], 60, torch.where(pos == self.ends[:, None], SP.eos, 61))
        return torch.nn.functional.one_hot(target, 100).float() * 20


def test_stop_at_eos_gives_variable_lengths_and_saves_calls():
    template, _ = prompt_template([[7], [8]], 32, SP)
    cfg = dict(kind="remask", steps=32, block_length=4, temperature=0.0)
    full = sample(EndsAt([5, 13]), template, SamplerConfig(**cfg), SP)
    cut = sample(EndsAt([5, 13]), template, SamplerConfig(stop_at_eos=True, **cfg), SP)
    assert cut.lengths.tolist() == [5, 13] and full.lengths.tolist() == [32, 32]
    assert cut.tokens[0, :6].tolist() == [2, 7, 60, 60, 60, SP.eos]
    assert (cut.tokens[0, 6:] == SP.pad).all() and (cut.tokens[1, 14:] == SP.pad).all()
    assert torch.equal(cut.tokens[:, :5], full.tokens[:, :5])
    assert cut.nfe < full.nfe  # both rows finish after their <eos> block: the later blocks are never decoded
    assert cut.num_generated == (5 - 2) + (13 - 2)
    assert cut.token_lists(SP) == [[7, 60, 60, 60], [8] + [60] * 11]
    assert cut.token_lists(SP, generated_only=True)[0] == [60, 60, 60]


def test_rare_tokens_are_drawn_at_their_rate():
    # a token at probability ~1e-4 next to a dominant one: no truncation of the noise tail shows at this rate
    logits = torch.tensor([[0.0, math.log(1e-4)]])
    freq = draw(logits, n=400000, temperature=1.0, top_k=0, top_p=1.0)
    p = 1e-4 / (1 + 1e-4)
    assert abs(freq[1] - p) < 5 * math.sqrt(p / 400000)
