"""Sampler invariants on the tiny model: committed and fixed tokens never change, every mask is filled,
NFE <= steps, caching is exact, blocks go left to right, guidance 0 is the conditional model."""

import pytest
import torch

from unmask.config import ModelConfig
from unmask.core.sampling import block_ids
from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig, sample
from unmask.diffusion.sampler_template import infill_template, prompt_template
from unmask.model.build import build_model

SP = SpecialTokens()
VARIANTS = [
    dict(kind="ancestral"),
    dict(kind="ancestral", block_length=8),
    dict(kind="remask", remasking="low_confidence"),
    dict(kind="remask", remasking="random", block_length=8),
]


class Recorder(torch.nn.Module):
    """Passes through to the model and keeps every input it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def forward(self, x, t=None):
        self.calls.append(x.clone())
        return self.model(x) if t is None else self.model(x, t)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(size="tiny"))


def infill():
    # prefix, a masked span, a fixed middle, a masked span, a fixed suffix; the second row is shorter
    return infill_template([[[10, 11, 12], 6, [20, 21], 9, [30, 31]], [[40], 12, [41]]], SP)


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fixed_and_committed_tokens_never_change_and_all_masks_fill(tiny, variant, schedule):
    template, _ = infill()
    model = Recorder(tiny)
    out = sample(model, template, SamplerConfig(steps=12, **variant), SP, schedule=schedule).tokens
    fixed = template != SP.mask
    assert torch.equal(out[fixed], template[fixed])
    assert not (out == SP.mask).any()
    # every network input agrees with the final output wherever it was already unmasked
    assert model.calls
    for x in model.calls:
        seen = x != SP.mask
        assert torch.equal(x[seen], out[seen])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("steps", [1, 3, 16, 100])
def test_steps_bound_network_calls(tiny, variant, steps):
    template, _ = prompt_template([[7, 8, 9], [5]], 24, SP)
    if variant.get("block_length"):
        steps = max(steps, 3)  # 21 masks in blocks of 8: three blocks need three steps
    model = Recorder(tiny)
    res = sample(model, template, SamplerConfig(steps=steps, guidance=0.5, **variant), SP)
    assert res.nfe == len(model.calls) <= steps
    assert res.steps <= steps


@pytest.mark.parametrize("variant", VARIANTS)
def test_caching_is_exact_and_saves_calls(tiny, variant):
    template, _ = prompt_template([[7, 8, 9], [5, 6]], 20, SP)
    runs = {c: sample(tiny, template, SamplerConfig(steps=64, seed=3, cache=c, **variant), SP) for c in (True, False)}
    assert torch.equal(runs[True].tokens, runs[False].tokens)
    assert runs[False].nfe == runs[False].steps  # the uncached baseline calls the network every step
    assert runs[True].nfe < runs[False].nfe  # 64 steps for <= 19 masks: most steps change nothing


@pytest.mark.parametrize("kind", ["ancestral", "remask"])
def test_blocks_are_decoded_left_to_right(tiny, kind):
    template, _ = infill()
    blocks = block_ids(template == SP.mask, 4)
    model = Recorder(tiny)
    sample(model, template, SamplerConfig(kind=kind, steps=32, block_length=4), SP)
    checked = 0
    for x in model.calls:
        for b in range(x.shape[0]):
            open_blocks = blocks[b][(x[b] == SP.mask) & (blocks[b] >= 0)]
            started = blocks[b][(x[b] != SP.mask) & (blocks[b] >= 0)]
            if len(open_blocks) and len(started):
                # anything already generated lies in blocks no later than the first block with masks left
                assert started.max() <= open_blocks.min()
                checked += 1
    assert checked > 10


def test_guidance_weight_zero_is_the_conditional_model(tiny):
    template, prompt_mask = prompt_template([[7, 8, 9, 10], [5, 6]], 20, SP)
    cond, plain = Recorder(tiny), Recorder(tiny)
    tiny_weight = 1e-300  # runs the guided path (2B rows per call) with a weight that vanishes in float32
    guided = sample(cond, template, SamplerConfig(steps=8, guidance=tiny_weight), SP, prompt_mask=prompt_mask)
    unguided = sample(plain, template, SamplerConfig(steps=8, guidance=0.0), SP, prompt_mask=prompt_mask)
    assert torch.equal(guided.tokens, unguided.tokens)
    assert cond.calls[0].shape[0] == 4 and plain.calls[0].shape[0] == 2
    # the unconditional half sees the prompt masked and the rest unchanged
    x, uncond = cond.calls[0][:2], cond.calls[0][2:]
    assert (uncond[prompt_mask] == SP.mask).all() and torch.equal(uncond[~prompt_mask], x[~prompt_mask])


class PromptSensitive(torch.nn.Module):
    """Favours token 100 (logit +1) when the prompt at position 1 is visible, token 200 when it is masked."""

    def forward(self, x, t=None):
        logits = torch.zeros(*x.shape, 256)
        visible = (x[:, 1] != SP.mask)[:, None].float()  # [B, 1]
        logits[..., 100] = visible
        logits[..., 200] = 1 - visible
        return logits


def test_guidance_pushes_towards_the_prompt_conditioned_prediction():
    template, _ = prompt_template([[7, 8]] * 8, 40, SP)
    share = {}
    for w in (0.0, 3.0):
        out = sample(PromptSensitive(), template, SamplerConfig(steps=4, guidance=w), SP)
        generated = out.tokens[template == SP.mask]
        share[w] = float((generated == 100).float().mean())
    # w = 0: e / (e + 254) ~ 1%; w = 3: e^4 / (e^4 + e^-3 + 253) ~ 18%
    assert share[0.0] < 0.05 and share[3.0] > 0.1, share


def test_same_seed_same_output_other_seed_differs(tiny):
    template, _ = prompt_template([[7, 8, 9]] * 3, 24, SP)
    a, b, c = (sample(tiny, template, SamplerConfig(steps=10, seed=s), SP).tokens for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows of a batch draw their own noise


class Recording(torch.nn.Module):
    """A time-conditioned model that records every (tokens, t) it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def forward(self, x, t=None):
        self.calls.append((x.clone(), t.clone()))
        return self.model(x, t)


def test_time_conditioned_model_gets_decreasing_times():
    torch.manual_seed(0)
    spy = Recording(build_model(ModelConfig(size="tiny", time_conditioning=True)))
    template, _ = prompt_template([[7, 8]], 16, SP)
    out = sample(spy, template, SamplerConfig(steps=6, cache=False), SP)
    times = [float(t[0]) for _, t in spy.calls]
    assert not (out.tokens == SP.mask).any()
    assert times == sorted(times, reverse=True) and times[0] == 1.0 and 0 < times[-1] < 1


@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_time_conditioned_model_reads_each_rows_share_of_masks_in_block_decoding(guidance):
    # Training feeds the network t with mask probability = the share of the row's maskable tokens masked; block
    # decoding once passed each block's own schedule time (1.0 at the start of every block) whatever the row.
    torch.manual_seed(0)
    spy = Recording(build_model(ModelConfig(size="tiny", time_conditioning=True)))
    template, prompt = prompt_template([[7, 8], [7, 8, 9, 10, 11]], 18, SP)  # 15 and 12 positions to generate
    config = SamplerConfig(kind="remask", steps=8, block_length=4, guidance=guidance, cache=False)
    sample(spy, template, config, SP, prompt_mask=prompt)
    calls = spy.calls
    maskable = torch.cat([~prompt, torch.ones_like(prompt)]) if guidance else ~prompt  # unconditional: prompt masked
    for x, t in calls:
        share = (x == SP.mask).sum(1) / maskable.sum(1)
        assert torch.allclose(t, share.float()), (t, share)
    assert len(calls) == 8 and calls[2][1][0].item() == pytest.approx(11 / 15)  # block 2 starts with 3 blocks masked
