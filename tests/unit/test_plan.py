"""The planner: parameter split, ZeRO model-state arithmetic, the activation model against the tensors autograd
actually saves (one process), candidate layouts and the CLI."""

import importlib.util
from pathlib import Path

import pytest
import torch

from unmask.cli import main
from unmask.config import load_config
from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import build_objective
from unmask.model.build import build_model
from unmask.model.counting import param_count
from unmask.plan.gpus import GPUS
from unmask.plan.layouts import candidates
from unmask.plan.memory import Layout, estimate, rank_params

ROOT = Path(__file__).parents[2]


def bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("size", ["tiny", "small", "8b"])
def test_rank_params(size):
    m = load_config(None, {"model": {"size": size}}).model
    assert rank_params(m, 1, 1) == param_count(m)
    if size == "8b":
        assert param_count(m) / 8 < rank_params(m, 4, 2) < param_count(m) / 6  # norms replicated, head on a stage


def test_zero_model_states():
    cfg = load_config(None, {"model": {"size": "tiny"}})
    P = param_count(cfg.model)
    states = {z: estimate(cfg, Layout(dp=4, zero=z), gpu=False).model_states for z in range(4)}
    # fp32: weights 4 + grads 4 + Adam 8; ZeRO 1-2 add DeepSpeed's fp32 partition (4/N) and shard Adam; ZeRO-3
    # updates its fp32 weight partitions in place (no master copy).
    assert states == pytest.approx({0: 16 * P, 1: 8 * P + 12 * P / 4, 2: 4 * P + 16 * P / 4, 3: 16 * P / 4})
    bf16 = load_config(None, {"model": {"size": "tiny"}, "train": {"dtype": "bf16"}})
    assert estimate(bf16, Layout(dp=4, zero=0), gpu=False).model_states == pytest.approx(16 * P)  # ZeRO paper
    assert estimate(bf16, Layout(dp=4, zero=3), gpu=False).model_states == pytest.approx(16 * P / 4)


@pytest.mark.parametrize("overrides,diffusion", [
    ({}, {}), ({"n_kv_heads": 4}, {}), ({"size": "small", "n_layers": 2}, {}), ({}, {"objective": "duo"}),
    ({}, {"objective": "duo", "curriculum_end": 10})])
def test_activations_match_saved_tensors(overrides, diffusion):
    """Bytes autograd saves in one forward of the real loss, against the planner (expected mask rate 1/2; duo
    scores every position, and its curriculum's soft input is saved for the embedding's backward)."""
    if diffusion:
        overrides = {**overrides, "time_conditioning": True}
    cfg = load_config(None, {"model": {"size": "tiny", **overrides}, "train": {"seq_len": 128},
                             "diffusion": diffusion})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = build_objective(cfg.diffusion, 4, 0, cfg.model.time_conditioning, vocab_size=cfg.model.vocab_size)
    x0 = torch.randint(5, cfg.model.vocab_size, (8, 128))
    saved = bench_memory().SavedTensors(model)
    with saved.hooks():
        objective.loss(model, x0, BatchKey(0, global_batch=8)).loss.backward()
    planned = estimate(cfg, Layout(dp=1, micro=8), gpu=False).activations
    assert planned == pytest.approx(saved.bytes, rel=0.05)


def test_checkpointing_and_tp_shrink_activations():
    cfg = load_config("configs/8b.toml")
    plain = estimate(cfg, Layout(dp=16, micro=2)).activations
    assert estimate(cfg, Layout(dp=16, micro=2, ckpt=True)).activations < plain / 5
    assert estimate(cfg, Layout(dp=4, tp=4, micro=2)).activations < plain / 2


def test_candidates_for_8b_on_64_h100():
    cfg = load_config("configs/8b.toml")
    gpu = GPUS["h100"]
    found = candidates(cfg, 64, gpu["memory"], gpu["bf16"], 0.4, 5e10, 4096)
    best = found[0]
    assert best.fits and best.layout.dp * best.layout.tp * best.layout.pp == 64 and best.layout.tp <= 8
    assert all(c.layout.zero <= 1 for c in found if c.layout.pp > 1)
    assert any(not c.fits for c in found)  # ZeRO 0 without sharding: 16 bytes x 8B parameters do not fit
    assert best.tokens_per_s == max(c.tokens_per_s for c in found if c.fits)


def test_cli(capsys):
    assert main(["plan", "configs/8b.toml", "--gpus", "64", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "8.02B parameters" in out and "recommended: --parallel.tp=" in out and "the config's own layout" in out
    assert main(["plan", "configs/8b.toml", "--gpus", "8", "--gpu", "b200"]) == 2
    assert "--gpu 'b200' is not known" in capsys.readouterr().err


def test_block_diffusion_counts_both_streams():
    """x_t and x_0 run through every block side by side: twice the block activations and matmul FLOPs per data
    token, four times the attention; the head reads x_t only."""
    from unmask.config import Config
    from unmask.model.counting import matmul_params, train_flops_per_token
    from unmask.plan.memory import Layout, estimate

    base = {"model": {"size": "125m"}, "train": {"seq_len": 1024}}
    mdlm = Config.model_validate(base)
    bd3 = Config.model_validate({**base, "diffusion": {"objective": "bd3lm", "block_size": 16}})
    m = mdlm.model
    head = m.vocab_size * m.dim
    attention = 12 * m.n_layers * 1024 * m.n_heads * m.head_dim
    assert train_flops_per_token(m, 1024, 2) == 6 * (2 * (matmul_params(m) - head) + head) + 4 * attention
    assert train_flops_per_token(m, 1024, 1) == 6 * matmul_params(m) + attention
    layout = Layout(dp=8, zero=1, micro=4)
    a, b = estimate(mdlm, layout), estimate(bd3, layout)
    assert b.params == a.params and 1.5 * a.activations < b.activations < 2.01 * a.activations
