"""Fast generation (issue 17, items 3 and 4) on the tiny model: threshold decoding, Fast-dLLM's approximate
prefix/dual KV cache, and the AR baseline's KV-cached decoding, each checked against the sampler it shortcuts."""

import dataclasses

import pytest
import torch

from unmask.config import ModelConfig
from unmask.core.kv_cache import KVCache
from unmask.core.sampling import block_ids
from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig, SamplingError, sample
from unmask.diffusion.sampler_template import infill_template, prompt_template
from unmask.model.build import build_model

SP = SpecialTokens()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(causal=False, **overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(size="tiny", **overrides), causal=causal).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def ar_model():
    return tiny(causal=True)


def prompts(length=33):
    # Prompts of one length: every row's blocks then hold the same number of masks, so remask commits one a step.
    template, _ = prompt_template([[10, 11, 12], [40, 41, 42]], length, SP)
    return template


def infill():
    return infill_template([[[10, 11, 12], 6, [20, 21], 9, [30, 31]], [[40], 12, [41]]], SP)[0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("block_length, guidance", [(None, 0.0), (10, 0.0), (10, 1.5)])
def test_threshold_one_is_low_confidence_remasking_one_token_a_step(model, temperature, block_length, guidance):
    # At threshold 1 only the forced most confident mask is committed each step; remask with one step per mask
    # commits the same one, after the same choose_tokens draw (same masks, same seed, same noise).
    template = prompts()  # 29 masks a row: blocks of 10, 10 and 9
    masks = int((template[0] == SP.mask).sum())
    knobs = dict(temperature=temperature, block_length=block_length, guidance=guidance, seed=4)
    fast = sample(model, template, SamplerConfig(kind="threshold", threshold=1.0, **knobs), SP)
    slow = sample(model, template, SamplerConfig(kind="remask", remasking="low_confidence", steps=masks, **knobs), SP)
    assert torch.equal(fast.tokens, slow.tokens)
    assert fast.steps == fast.nfe == slow.nfe == masks


def test_low_threshold_commits_a_whole_block_per_step(model):
    template = infill()
    out = sample(model, template, SamplerConfig(kind="threshold", threshold=1e-9, block_length=8), SP)
    fixed = template != SP.mask
    assert torch.equal(out.tokens[fixed], template[fixed]) and not (out.tokens == SP.mask).any()
    assert out.nfe == out.steps == int(block_ids(template == SP.mask, 8).max()) + 1


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
@pytest.mark.parametrize("variant", [dict(kind="threshold", threshold=0.3), dict(kind="remask", steps=30),
                                     dict(kind="ancestral", steps=30, guidance=1.0),
                                     dict(kind="threshold", threshold=0.2, stop_at_eos=True)])
def test_cache_refreshed_every_call_is_the_uncached_sampler(model, kv_cache, variant):
    template = prompts()
    plain = SamplerConfig(block_length=10, seed=2, **variant)
    cached = dataclasses.replace(plain, kv_cache=kv_cache, cache_refresh=1)
    a, b = sample(model, template, plain, SP), sample(model, template, cached, SP)
    assert torch.equal(a.tokens, b.tokens) and (a.nfe, a.steps) == (b.nfe, b.steps)


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
@pytest.mark.parametrize("refresh", [0, 3])
def test_approximate_cache_keeps_the_template_and_fills_every_mask(model, kv_cache, refresh):
    template = infill()
    cfg = SamplerConfig(kind="threshold", threshold=0.5, block_length=8, kv_cache=kv_cache, cache_refresh=refresh)
    out = sample(model, template, cfg, SP)
    fixed = template != SP.mask
    assert torch.equal(out.tokens[fixed], template[fixed]) and not (out.tokens == SP.mask).any()


@pytest.mark.parametrize("overrides", [{}, {"time_conditioning": True}, {"n_kv_heads": 1}])
@pytest.mark.parametrize("span", [(5, 12), (5, 33)])  # dual: a middle block; prefix: the block and all after it
def test_a_span_against_a_fresh_cache_is_the_full_forward(overrides, span):
    # What the approximate cache approximates: with no token changed since the cache was filled, re-running a
    # span against it gives exactly (to float error) the full forward's logits there.
    net = tiny(**overrides)
    x = torch.randint(5, 200, (2, 33), generator=torch.Generator().manual_seed(1))
    t = (torch.rand(2),) if overrides.get("time_conditioning") else ()
    with torch.no_grad():
        full = net(x, *t)
        kv = KVCache()
        torch.testing.assert_close(net(x, *t, kv=kv.append()), full, rtol=0, atol=0)  # filling is the forward
        a, b = span
        torch.testing.assert_close(net(x[:, a:b], *t, kv=kv.splice(a)), full[:, a:b], rtol=1e-5, atol=1e-5)


def test_ar_cache_gives_the_full_forwards_logits(ar_model):
    x = torch.randint(5, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ar_model(x)
        kv = KVCache()
        steps = [ar_model(x[:, :8], kv=kv.append())] + [ar_model(x[:, i:i + 1], kv=kv.append()) for i in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("knobs", [dict(temperature=1.0), dict(temperature=0.0), dict(top_k=20, temperature=0.8),
                                   dict(stop_at_eos=True)])
def test_ar_kv_cache_gives_the_uncached_tokens(ar_model, knobs):
    template, _ = prompt_template([[10, 11, 12], [40]], 24, SP)  # rows start generating at different columns
    plain = SamplerConfig(kind="ar", seed=3, **knobs)
    a = sample(ar_model, template, plain, SP)
    b = sample(ar_model, template, dataclasses.replace(plain, kv_cache="prefix"), SP)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths) and a.nfe == b.nfe
    assert torch.equal(a.tokens[0, :4], template[0, :4]) and not (a.tokens == SP.mask).any()
    if not knobs.get("stop_at_eos"):
        assert a.nfe == a.steps == 24 - 2  # one per position from the first row's first mask


def test_ar_stops_when_every_row_has_ended(ar_model):
    with torch.no_grad():
        ar_model.output.weight[SP.eos] += 5 * ar_model.output.weight[SP.eos].sign()  # make <eos> likely
    try:
        template, _ = prompt_template([[10], [20]], 24, SP)
        out = sample(ar_model, template, SamplerConfig(kind="ar", kv_cache="prefix", stop_at_eos=True), SP)
    finally:
        with torch.no_grad():
            ar_model.output.weight[SP.eos] -= 5 * ar_model.output.weight[SP.eos].sign()
    assert (out.lengths < 24).all() and out.nfe < 22
    pos = torch.arange(24)[None]
    assert (out.tokens[pos > out.lengths[:, None]] == SP.pad).all()


@pytest.mark.parametrize("options, message", [
    (dict(kind="threshold", threshold=0.0), "threshold=0.0: must be in"),
    (dict(kv_cache="full"), "kv_cache='full'; allowed"),
    (dict(cache_refresh=-1, kv_cache="dual"), "cache_refresh=-1"),
    (dict(cache_refresh=2), "set kv_cache to 'prefix' or 'dual'"),
    (dict(kind="ar", kv_cache="dual"), "use kv_cache='prefix'"),
    (dict(kind="ar", guidance=1.0), "set guidance=0 for kind='ar'"),
])
def test_option_errors(options, message):
    with pytest.raises(SamplingError, match=message):
        SamplerConfig(**options)


def test_sampler_and_model_must_agree(model, ar_model):
    template = prompts()
    with pytest.raises(SamplingError, match="use kind='ar'"):
        sample(ar_model, template, SamplerConfig(), SP)
    with pytest.raises(SamplingError, match="attends both ways"):
        sample(model, template, SamplerConfig(kind="ar"), SP)
    with pytest.raises(SamplingError, match="fixed token .* before its first <mask>"):
        sample(ar_model, torch.full((1, 8), SP.mask), SamplerConfig(kind="ar"), SP)
    bare = lambda x: model(x)  # noqa: E731 - a model without the kv argument
    with pytest.raises(SamplingError, match="use kv_cache='none'"):
        sample(bare, template, SamplerConfig(kv_cache="dual"), SP)


class Widths(torch.nn.Module):
    """Passes through to the model (kv argument included) and keeps the width of every call."""

    supports_kv_cache = True

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.widths = model, model.cfg, []

    def forward(self, x, kv=None):
        self.widths.append(x.shape[1])
        return self.model(x, kv=kv)


@pytest.mark.parametrize("kv_cache, width", [("dual", 10), ("prefix", 29)])
def test_cache_runs_the_whole_sequence_once_a_block(model, kv_cache, width):
    net = Widths(model)
    out = sample(net, prompts(), SamplerConfig(kind="remask", steps=29, block_length=10, kv_cache=kv_cache), SP)
    full = [i for i, w in enumerate(net.widths) if w == 33]
    assert full == [0, 10, 20] and out.nfe == len(net.widths) == 29  # <bos>, 3 prompt tokens, 29 masks
    assert net.widths[1:10] == [width] * 9  # first block: the block alone (dual) or the block and all after (prefix)


@pytest.mark.parametrize("kind", ["threshold", "ar"])
def test_speed_reports_the_kv_cache_and_its_nfe(model, ar_model, kind):
    from unmask.eval.speed import measure_speed

    net = ar_model if kind == "ar" else model
    cfg = SamplerConfig(kind=kind, kv_cache="prefix", block_length=None if kind == "ar" else 10)
    speed, out = measure_speed(net, prompts(), cfg, SP)
    assert (speed.kind, speed.kv_cache, speed.nfe) == (kind, "prefix", out.nfe) and speed.generated_tokens == 58
