"""The exported modeling file computes unmask's logits (both architecture families), and the key map is exact."""

import pytest
import torch

from unmask.config import Config
from unmask.data.special import SpecialTokens
from unmask.model.hf.adapter import from_hf, to_hf
from unmask.model.hf.export import hf_model
from unmask.model.transformer import build_model

VARIANTS = [{}, {"tie_embeddings": True}, {"time_conditioning": True}, {"n_kv_heads": 1},
            {"arch": "bert", "n_kv_heads": None}, {"arch": "bert", "n_kv_heads": None, "tie_embeddings": True}]


def random_model(variant: dict, objective: str = "mdlm"):
    cfg = Config.model_validate({"model": {"size": "tiny", **variant}, "train": {"seq_len": 64},
                                 "diffusion": {"objective": objective}})
    torch.manual_seed(0)
    model = build_model(cfg.model, causal=objective == "ar").eval()
    with torch.no_grad():  # every weight random: zero-initialised adaLN or norms would hide mistakes
        for p in model.parameters():
            p.normal_(std=0.2 if p.ndim > 1 else 1.0)
    return cfg, model


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_logits_equal_unmask(variant):
    cfg, model = random_model(variant)
    hf = hf_model(cfg, model.state_dict(), SpecialTokens())
    x = torch.randint(0, cfg.model.vocab_size, (2, 48))
    t = torch.rand(2)
    ours = model(x, t) if cfg.model.time_conditioning else model(x)
    torch.testing.assert_close(hf(x, t=t).logits, ours, atol=1e-5, rtol=0)
    if cfg.model.tie_embeddings:
        assert hf.lm_head.weight is hf.model.tok_embeddings.weight


def test_causal_baseline_exports_causal_attention():
    cfg, model = random_model({}, objective="ar")
    hf = hf_model(cfg, model.state_dict(), SpecialTokens())
    x = torch.randint(0, cfg.model.vocab_size, (1, 32))
    torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_key_map_round_trip(variant):
    cfg, model = random_model(variant)
    state = model.state_dict()
    hf_state = to_hf(state, cfg.model.tie_embeddings)
    assert ("lm_head.weight" in hf_state) != cfg.model.tie_embeddings  # a tied output is stored once
    back = from_hf(hf_state, cfg.model.tie_embeddings)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_hf_model_refuses_an_attention_mask_with_padding():
    cfg, model = random_model({})
    hf = hf_model(cfg, model.state_dict(), SpecialTokens())
    x = torch.randint(0, cfg.model.vocab_size, (1, 8))
    torch.testing.assert_close(hf(x, attention_mask=torch.ones_like(x)).logits, model(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attend to every position"):
        hf(x, attention_mask=torch.zeros_like(x))
