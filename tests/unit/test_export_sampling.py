"""The exported sampler (sampling_unmask.py, plain torch) gives unmask's samples for the same seed."""

import pytest
import torch

from tests.unit.test_export_hf import random_model
from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig, sample
from unmask.diffusion.sampler_template import infill_template, prompt_template
from unmask.model.hf import sampling_unmask
from unmask.model.hf.export import hf_model

SP = SpecialTokens()
OPTIONS = [
    dict(kind="ancestral", steps=16),
    dict(kind="ancestral", steps=16, cache=False, block_length=8),
    dict(kind="ancestral", steps=8, temperature=0.0),
    dict(kind="ancestral", steps=12, top_k=20, top_p=0.9, temperature=0.8, seed=3),
    dict(kind="remask", steps=16, remasking="low_confidence"),
    dict(kind="remask", steps=16, remasking="random", block_length=8, seed=1),
    dict(kind="remask", steps=10, guidance=1.5, temperature=0.0),
    dict(kind="ancestral", steps=20, stop_at_eos=True, seed=2),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from more threads, and on a busy machine their hand-offs cost 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    cfg, model = random_model({"time_conditioning": True})
    with torch.no_grad():  # make <eos> likely somewhere, so stop_at_eos has something to stop at
        model.output.weight[SP.eos] *= 3
    return cfg, model, hf_model(cfg, model.state_dict(), SP)


def templates():
    prompts, _ = prompt_template([[10, 11, 12], [40, 41]], 32, SP)
    infill, _ = infill_template([[[10, 11, 12], 6, [20, 21], 9, [30, 31]], [[40], 12, [41]]], SP)
    return [prompts, infill]


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
@pytest.mark.parametrize("options", OPTIONS)
def test_same_tokens_as_unmask_sampler(models, options, schedule):
    cfg, model, hf = models
    for template in templates():
        ours = sample(model, template, SamplerConfig(**options), SP, schedule=schedule)
        out = hf.diffusion_generate(template=template, **options) if schedule == "loglinear" else None
        tokens, lengths, nfe, steps = sampling_unmask.sample(
            lambda x, t=None: hf(x, t=t).logits, template, SP.to_dict(), schedule, cfg.model.max_seq_len,
            True, **options)
        assert torch.equal(tokens, ours.tokens) and torch.equal(lengths, ours.lengths)
        assert (nfe, steps) == (ours.nfe, ours.steps)
        if out is not None:
            assert torch.equal(out["sequences"], ours.tokens) and out["nfe"] == ours.nfe


def test_generate_from_a_prompt_and_config_defaults(models):
    cfg, model, hf = models
    hf.config.sampler = {"steps": 8, "kind": "remask"}
    prompt = torch.tensor([[SP.bos, 10, 11]])
    out = hf.diffusion_generate(prompt, max_length=24, seed=5)
    template, _ = prompt_template([[10, 11]], 24, SP)
    ours = sample(model, template, SamplerConfig(steps=8, kind="remask", seed=5), SP)
    assert torch.equal(out["sequences"], ours.tokens) and out["steps"] == 8
    with pytest.raises(ValueError, match="max_length"):
        hf.diffusion_generate(prompt)
