"""An exported folder, loaded by transformers alone in a fresh interpreter (no unmask importable), gives unmask's
logits and unmask's samples for the same seed: ancestral, remask and threshold, caching (and, in process, the KV
cache), blocks, top-k/top-p, guidance, stop_at_eos, both schedules, both architecture families and an adapted
(shifted) causal LM."""

import pytest
import torch

from tests.support.fresh_hf import run_fresh
from tests.unit.test_export_hf import random_model
from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig, sample
from unmask.diffusion.sampler_template import infill_template, prompt_template
from unmask.errors import CheckpointError
from unmask.export.hf import hf_config, hf_model, write_model

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
    dict(kind="threshold", threshold=0.5, block_length=8, seed=1),
]
MODELS = {  # name -> (model variant, noise schedule)
    "time-conditioned": ({"time_conditioning": True}, "loglinear"),
    "gqa-tied-cosine": ({"n_kv_heads": 1, "tie_embeddings": True}, "cosine"),
    "bert": ({"arch": "bert", "n_kv_heads": None, "tie_embeddings": True}, "loglinear"),
    "shifted": ({"shift_logits": True, "n_kv_heads": 2}, "loglinear"),  # an adapted causal LM (Dream's shift)
}


pytestmark = pytest.mark.usefixtures("one_thread")


def templates():
    prompts, _ = prompt_template([[10, 11, 12], [40, 41]], 32, SP)
    infill, _ = infill_template([[[10, 11, 12], 6, [20, 21], 9, [30, 31]], [[40], 12, [41]]], SP)
    return [prompts, infill]


def model_of(name):
    variant, schedule = MODELS[name]
    cfg, model = random_model(variant, schedule=schedule)
    with torch.no_grad():  # make <eos> likely somewhere, so stop_at_eos has something to stop at
        model.output.weight[SP.eos] *= 3
    return cfg, model


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Every model exported, then loaded and sampled in one fresh interpreter: name -> (cfg, model, inputs, got)."""
    work = tmp_path_factory.mktemp("fresh")
    jobs, models = [], {}
    for name in MODELS:
        cfg, model = model_of(name)
        (work / name).mkdir()
        write_model(work / name, cfg, model.state_dict(), SP)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
        t = torch.rand(2) if cfg.model.time_conditioning else None
        jobs.append({"folder": str(work / name), "tokens": tokens, "t": t, "templates": templates(),
                     "options": OPTIONS})
        models[name] = cfg, model, tokens, t
    return {name: (*models[name], got) for name, got in zip(MODELS, run_fresh(jobs, work), strict=True)}


@pytest.mark.parametrize("name", MODELS)
def test_fresh_interpreter_gives_unmask_logits_and_hidden_states(fresh, name):
    cfg, model, tokens, t, got = fresh[name]
    assert (got["config"], got["base"]) == ("UnmaskConfig", "UnmaskModel")
    with torch.no_grad():
        ours = model(tokens, t)
        torch.testing.assert_close(got["logits"], ours, atol=1e-5, rtol=0)
        # AutoModel's hidden states are those just before the vocabulary projection (bert: before its MLM head).
        hidden = model.head(got["hidden"]) if cfg.model.arch == "bert" else got["hidden"]
        logits = model.output(hidden)
        if cfg.model.shift_logits:  # hidden states stay per position; the shift is the head's reading of them
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        torch.testing.assert_close(logits, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_fresh_interpreter_gives_unmask_samples(fresh, name):
    cfg, model, _, _, got = fresh[name]
    for options, rows in zip(OPTIONS, got["samples"], strict=True):
        for template, out in zip(templates(), rows, strict=True):
            ours = sample(model, template, SamplerConfig(**options), SP, schedule=cfg.diffusion.schedule)
            assert torch.equal(out["sequences"], ours.tokens) and torch.equal(out["lengths"], ours.lengths), options
            assert (out["nfe"], out["steps"]) == (ours.nfe, ours.steps), options


def test_generate_from_a_prompt_and_config_defaults():
    cfg, model = model_of("time-conditioned")
    hf = hf_model(cfg, model.state_dict(), SP)
    hf.config.sampler = {"steps": 8, "kind": "remask"}
    prompt = torch.tensor([[SP.bos, 10, 11]])
    out = hf.diffusion_generate(prompt, max_length=24, seed=5)
    template, _ = prompt_template([[10, 11]], 24, SP)
    ours = sample(model, template, SamplerConfig(steps=8, kind="remask", seed=5), SP)
    assert torch.equal(out["sequences"], ours.tokens) and out["steps"] == 8
    fast = dict(kind="threshold", threshold=0.5, block_length=8, kv_cache="dual", seed=5)
    out = hf.diffusion_generate(prompt, max_length=24, **fast)
    ours = sample(model, template, SamplerConfig(**fast), SP)
    assert torch.equal(out["sequences"], ours.tokens) and out["nfe"] == ours.nfe
    with pytest.raises(ValueError, match="max_length"):
        hf.diffusion_generate(prompt)
    with pytest.raises(ValueError, match="sampler: kind='beam' is not a sampler"):
        hf.diffusion_generate(prompt, max_length=24, kind="beam")


def test_an_ar_export_decodes_left_to_right_with_its_kv_cache():
    cfg, model = random_model({}, objective="ar")
    hf = hf_model(cfg, model.state_dict(), SP)
    assert hf.config.sampler == {"kind": "ar", "kv_cache": "prefix"}
    out = hf.diffusion_generate(torch.tensor([[SP.bos, 10, 11]]), max_length=24, seed=5)
    template, _ = prompt_template([[10, 11]], 24, SP)
    ours = sample(model, template, SamplerConfig(kind="ar", seed=5), SP)  # uncached: the same tokens
    assert torch.equal(out["sequences"], ours.tokens) and out["nfe"] == 21
    with pytest.raises(CheckpointError, match="sampler kind 'remask' does not decode this autoregressive"):
        hf_config(cfg, SP, sampler={"kind": "remask"})
