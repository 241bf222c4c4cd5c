"""Block diffusion (BD3-LM, issue 17 items 1-2): the objective's limits (block size 1 is the autoregressive
factorisation, one block is MDLM), the vectorised training pass against the sequence the sampler sees, and the exact
KV cache of the block sampler against the uncached one."""

import dataclasses

import pytest
import torch

from unmask.config import Config, DiffusionConfig, ModelConfig
from unmask.core.transformer import vectorised_block_mask
from unmask.data.special import SpecialTokens
from unmask.diffusion.block import BlockDiffusion
from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import MaskedDiffusion, build_objective
from unmask.diffusion.sampler import SamplerConfig, SamplingError, sample
from unmask.diffusion.sampler_template import prompt_template
from unmask.model.build import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
SP = SpecialTokens()
L = 16


def tiny(block_size=0, **overrides):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", **overrides), block_size=block_size).eval()
    with torch.no_grad():  # a sharper, non-uniform network, so that wrong attention shows in the logits
        model.tok_embeddings.weight.mul_(20)
    return model


def clean(B=4, seed=0):
    return torch.randint(5, 200, (B, L), generator=torch.Generator().manual_seed(seed))


def block_objective(block_size, **kw):
    return BlockDiffusion(DiffusionConfig(objective="bd3lm", block_size=block_size, **kw), SP.mask, SP.pad, seed=3)


@pytest.mark.parametrize("estimator", ["continuous", "exact_count"])
def test_one_block_is_masked_diffusion(estimator):
    x0, key = clean(), BatchKey(step=5, global_batch=4)
    block, full = tiny(block_size=L), tiny()
    full.load_state_dict(block.state_dict())
    got = block_objective(L, estimator=estimator).loss(block, x0, key)
    want = MaskedDiffusion(DiffusionConfig(estimator=estimator), SP.mask, SP.pad, seed=3).loss(full, x0, key)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    assert got.metrics == want.metrics  # the same tokens masked


def test_block_size_one_is_the_autoregressive_likelihood():
    """Every block is one token: the exact-count bound masks it and weighs it 1, so the loss is the mean of
    -log p(x_i | x_<i), which the model gives when it reads x_<i followed by <mask> (a causal decoder's query)."""
    model, x0 = tiny(block_size=1), clean()
    got = block_objective(1, estimator="exact_count").loss(model, x0, BatchKey(step=0, global_batch=4)).loss
    nll = []
    for i in range(L):
        probe = torch.cat([x0[:, :i], torch.full((4, 1), SP.mask)], dim=1)
        logits = model(probe)[:, i].float()
        logits[:, SP.mask] = float("-inf")
        nll.append(torch.nn.functional.cross_entropy(logits, x0[:, i], reduction="none"))
    assert got.item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-5)


@pytest.mark.parametrize("block_size", [1, 4, 5])
def test_training_pass_sees_what_the_sampler_sees(block_size):
    """The vectorised logits of block b equal those of one sequence: clean blocks before b, noised block b."""
    model, x0 = tiny(block_size=block_size), clean(B=2)
    xt = x0.masked_fill(torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) < 0.5, SP.mask)
    vectorised = model(xt, clean=x0)
    for start in range(0, L, block_size):
        stop = min(start + block_size, L)
        alone = model(torch.cat([x0[:, :start], xt[:, start:stop]], dim=1))[:, start:]
        torch.testing.assert_close(vectorised[:, start:stop], alone, rtol=1e-4, atol=1e-4)


def test_vectorised_mask_is_bd3lms():
    m = vectorised_block_mask(4, 2, "cpu").int()
    # rows: noised 0-3, clean 0-3; blocks {0,1}, {2,3}
    assert m.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0],
                          [0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0],
                          [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0],
                          [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]


def test_each_block_draws_its_own_stratified_time():
    obj, x0 = block_objective(4), clean(B=4)
    c = obj.corrupt(x0, BatchKey(step=2, global_batch=4))
    _, masked, weight, counts = c.targets
    assert weight.shape == x0.shape and weight.view(4, 4, 4).std(-1).max() == 0  # one weight per block
    assert len(set(weight.view(4, 4, 4)[..., 0].flatten().tolist())) == 16  # 16 strata over samples x blocks
    assert c.inputs[1] is x0 and torch.equal(c.inputs[0], x0.masked_fill(masked, SP.mask))
    assert counts.tolist() == [L] * 4


def test_exact_count_masks_k_of_each_block():
    obj, x0 = block_objective(4, estimator="exact_count"), clean(B=8)
    x0[:, -3:] = SP.pad  # the last block has one maskable token
    _, masked, weight, _ = obj.corrupt(x0, BatchKey(step=1, global_batch=8)).targets
    k = masked.view(8, 4, 4).sum(-1)
    n = (x0 != SP.pad).view(8, 4, 4).sum(-1)
    assert (k >= 1).all() and (k <= n).all() and not masked[x0 == SP.pad].any()
    torch.testing.assert_close(weight.view(8, 4, 4)[..., 0], (n / k).float())


def test_evaluation_is_deterministic_and_layout_free():
    model, x0, obj = tiny(block_size=4), clean(B=4), block_objective(4)
    whole = obj.eval_terms(model, x0, 4, BatchKey(step=9, global_batch=4))
    halves = [obj.eval_terms(model, x0[i:i + 2], 4, BatchKey(step=9, micro=0, dp_rank=i // 2, dp_world=2,
                                                           global_batch=4)) for i in (0, 2)]
    torch.testing.assert_close(whole.nll, torch.cat([h.nll for h in halves]))
    assert (whole.mc_var > 0).all()


def test_config_refuses_what_block_diffusion_cannot_do():
    base = {"model": {"size": "tiny"}, "train": {"seq_len": 32}}
    with pytest.raises(ValueError, match="time_conditioning"):
        Config.model_validate({**base, "diffusion": {"objective": "bd3lm"},
                               "model": {"size": "tiny", "time_conditioning": True}})
    with pytest.raises(ValueError, match="block_size=64 is longer than train.seq_len=32"):
        Config.model_validate({**base, "diffusion": {"objective": "bd3lm", "block_size": 64}})
    cfg = Config.model_validate({**base, "diffusion": {"objective": "bd3lm", "block_size": 8}})
    assert cfg.block_size == 8 and not cfg.causal
    assert isinstance(build_objective(cfg.diffusion, SP.mask, SP.pad), BlockDiffusion)
    assert Config.model_validate(base).block_size == 0


# ------------------------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def block_model():
    return tiny(block_size=4, max_seq_len=64)


def ragged_prompts(length=30):
    """Prompts of different lengths, one ending mid-block: rows start decoding in different blocks."""
    return prompt_template([[10, 11, 12], [40, 41, 42, 43, 44, 45]], length, SP)


@pytest.mark.parametrize("kind, knobs", [
    ("ancestral", {"steps": 28}),
    ("remask", {"steps": 28}),
    ("threshold", {"threshold": 0.5}),
    ("remask", {"steps": 28, "guidance": 1.5}),
    ("ancestral", {"steps": 56, "temperature": 0.0, "cache": False}),
])
def test_cached_block_sampling_gives_the_uncached_tokens(block_model, kind, knobs):
    template, prompt_mask = ragged_prompts()
    runs = {kv: sample(block_model, template, SamplerConfig(kind=kind, kv_cache=kv, seed=4, **knobs), SP,
                       prompt_mask=prompt_mask) for kv in ("none", "prefix")}
    assert torch.equal(runs["prefix"].tokens, runs["none"].tokens)
    assert runs["prefix"].nfe == runs["none"].nfe
    assert not (runs["prefix"].tokens == SP.mask).any()
    assert torch.equal(runs["prefix"].tokens[template != SP.mask], template[template != SP.mask])


class Counting(torch.nn.Module):
    """Records the length of every network call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.block_size, self.cfg, self.supports_kv_cache = model, model.block_size, model.cfg, True
        self.lengths = []

    def forward(self, x, kv=None):
        self.lengths.append(x.shape[1])
        return self.model(x, kv=kv)


def test_the_cache_runs_each_call_over_the_current_blocks_only(block_model):
    template, _ = prompt_template([[10, 11, 12]], 16, SP)  # <bos> + prompt fill block 0; blocks 1-3 decoded
    spy = Counting(block_model)
    sample(spy, template, SamplerConfig(kind="remask", steps=12, kv_cache="prefix"), SP)
    # Block 1's first call also stores block 0; later first calls store the block just decoded.
    assert spy.lengths == [8, 4, 4, 4] + [8, 4, 4, 4] * 2  # 4 masks a block, one committed a step


def test_block_model_sampler_errors(block_model):
    template, _ = ragged_prompts()
    for cfg, message in [(SamplerConfig(block_length=8), "trained on blocks of 4"),
                         (SamplerConfig(kv_cache="dual"), "kv_cache='dual'"),
                         (SamplerConfig(kv_cache="prefix", cache_refresh=2), "never needs refreshing"),
                         (SamplerConfig(steps=3), "fewer than the 7 blocks")]:
        with pytest.raises(SamplingError, match=message):
            sample(block_model, template, cfg, SP)


class EosAt(Counting):
    """The model, certain of <eos> at one absolute position (what a trained model does where a text ends)."""

    def __init__(self, model, position):
        super().__init__(model)
        self.position = position

    def forward(self, x, kv=None):
        logits = super().forward(x, kv).clone()
        start = kv.offset if kv is not None else 0
        if start <= self.position < start + x.shape[1]:
            logits[:, self.position - start, SP.eos] += 1e4
        return logits


@pytest.mark.parametrize("kv_cache", ["none", "prefix"])
def test_generation_stops_at_eos_with_nothing_after(block_model, kv_cache):
    template, _ = prompt_template([[10, 11, 12], [40, 41]], 24, SP)
    greedy = SamplerConfig(kind="threshold", kv_cache=kv_cache, temperature=0.0)  # rows independent of each other
    full = sample(EosAt(block_model, 100), template, greedy, SP)
    spy = EosAt(block_model, 9)
    result = sample(spy, template, dataclasses.replace(greedy, stop_at_eos=True), SP)
    assert result.lengths.tolist() == [9, 9]
    assert (result.tokens[:, 9] == SP.eos).all() and (result.tokens[:, 10:] == SP.pad).all()
    assert torch.equal(result.tokens[:, :9], full.tokens[:, :9])
    # Decoding ends with the block that holds <eos> (block 2 of 6): later blocks never reach the network.
    assert result.nfe < full.nfe
    assert kv_cache == "none" or max(spy.lengths) <= 12


@pytest.mark.parametrize("estimator", ["continuous", "exact_count"])
def test_clipped_schedule_trains_inside_its_range_and_validates_unclipped(estimator):
    obj, x0 = block_objective(4, estimator=estimator, clip=(0.3, 0.8)), clean(B=16)
    _, masked, weight, _ = obj.corrupt(x0, BatchKey(step=3, global_batch=16)).targets
    share = masked.view(16, 4, 4).float().mean(-1)
    if estimator == "continuous":  # loglinear: t is the mask rate, w(t) = 1/t
        block_t = 1 / weight.view(16, 4, 4)[..., 0]
        assert block_t.min() >= 0.3 and block_t.max() <= 0.8
    else:  # k = floor(share * 4) + 1 of 4
        assert share.min() >= 0.25 and share.max() <= 1.0 and (share * 4).min() >= 2
    unclipped = block_objective(4, estimator=estimator)
    model = tiny(block_size=4)
    key = BatchKey(step=0, global_batch=16)
    assert obj.eval_terms(model, x0, 2, key).nll.tolist() == unclipped.eval_terms(model, x0, 2, key).nll.tolist()
    with pytest.raises(ValueError, match=r"diffusion.clip=\[0.8, 0.3\]"):
        DiffusionConfig(clip=(0.8, 0.3))
