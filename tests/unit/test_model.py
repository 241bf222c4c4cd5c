"""The backbone: bidirectional vs causal attention, meta-device build, parameter and FLOP formulas."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from unmask.config import ModelConfig
from unmask.config_sizes import MODEL_SIZES
from unmask.model.build import build_model
from unmask.model.counting import param_count, train_flops_per_token


def test_bidirectional_sees_the_future_and_causal_does_not():
    torch.manual_seed(0)
    cfg = ModelConfig(size="tiny")
    x = torch.randint(0, cfg.vocab_size, (1, 32))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % cfg.vocab_size
    bi = build_model(cfg, causal=False)
    assert not torch.allclose(bi(x)[0, 0], bi(y)[0, 0])
    causal = build_model(cfg, causal=True)
    assert torch.equal(causal(x)[0, :-1], causal(y)[0, :-1])


@pytest.mark.parametrize("variant", [{}, {"tie_embeddings": True}, {"time_conditioning": True},
                                     {"n_kv_heads": 1}])
def test_meta_build_matches_parameter_formula(variant):
    cfg = ModelConfig(size="tiny", **variant)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
    assert all(not p.is_meta for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_named_sizes_build_on_meta(size):
    cfg = ModelConfig(size=size)
    model = build_model(cfg, device="meta")  # no memory touched, even for 8b
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)


def test_published_sizes():
    assert 18e6 < param_count(ModelConfig(size="small")) < 30e6
    assert 120e6 < param_count(ModelConfig(size="125m")) < 130e6
    assert 7.9e9 < param_count(ModelConfig(size="8b")) < 8.1e9  # LLaDA-8B: 8.02B


@pytest.mark.parametrize("causal", [False, True])
def test_flops_formula_matches_flop_counter(causal):
    cfg = ModelConfig(size="tiny", n_kv_heads=None)
    model = build_model(cfg, causal=causal)
    B, L = 2, 64
    x = torch.randint(0, cfg.vocab_size, (B, L))
    # The math backend decomposes attention into matmuls the counter sees (it counts causal in full).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    assert counter.get_total_flops() / (B * L) == pytest.approx(train_flops_per_token(cfg, L), rel=0.01)


def test_time_conditioning_starts_as_identity_and_needs_t():
    torch.manual_seed(0)
    cfg = ModelConfig(size="tiny", time_conditioning=True)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with pytest.raises(ValueError, match="time-conditioned"):
        model(x)
    # adaLN-zero: gates start at 0, so every block is the identity and t has no effect yet.
    assert torch.allclose(model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([0.9, 0.9])))
