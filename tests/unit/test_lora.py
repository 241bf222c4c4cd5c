"""LoRA through peft (unmask/model/lora.py): only adapters train, the optimizer holds only them, and merging them
into plain weights gives the same logits as the adapted model."""

from __future__ import annotations

import pytest
import torch

from tests.support.runs import REPO
from unmask.checkpoint.reshard import check_supported
from unmask.checkpoint.store import check_compatible
from unmask.config import load_config
from unmask.data.special import SpecialTokens
from unmask.diffusion.noise import BatchKey
from unmask.engines import build_components
from unmask.errors import CheckpointError, ConfigError
from unmask.model.build import build_model
from unmask.model.lora import merge_lora
from unmask.parallel.dims import ParallelDims

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = ("--lora.rank=4", "--lora.alpha=8", "--optim.warmup_steps=0", "--optim.lr=1e-2", "--train.micro_batch_size=4",
        "--train.seq_len=32")


def cfg_of(*overrides: str):
    return load_config(REPO / "configs" / "tiny.toml", [*LORA, *overrides])


def local_engine(cfg):
    return build_components(cfg, ParallelDims(), torch.device("cpu"), SpecialTokens()).engine


def train_steps(engine, cfg, n: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for step in range(n):
        x0 = torch.randint(5, cfg.model.vocab_size, (4, cfg.train.seq_len), generator=gen)
        assert not engine.train_step([x0], [BatchKey(step, global_batch=4)]).skipped


def test_only_adapters_train_and_the_base_stays_bit_identical():
    cfg = cfg_of()
    engine = local_engine(cfg)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    train_steps(engine, cfg, 3)
    named = dict(engine.model.named_parameters())
    adapters = {k for k in named if ".lora_" in k}
    assert len(adapters) == 2 * 7 * cfg.model.n_layers  # A and B on every default target of every block
    assert {k for k, p in named.items() if p.grad is not None} == adapters
    assert {k for k, p in named.items() if p.requires_grad} == adapters
    assert engine.local_weights().tensors.keys() == adapters  # what a weight EMA averages
    after = engine.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after if ".lora_" not in k)
    assert not torch.equal(after["layers.0.attention.wq.lora_B.default.weight"],
                           before["layers.0.attention.wq.lora_B.default.weight"])  # B moved off zero


def test_the_optimizer_holds_only_adapters():
    cfg = cfg_of()
    engine = local_engine(cfg)
    train_steps(engine, cfg, 1)
    adapters = {id(p) for k, p in engine.model.named_parameters() if ".lora_" in k}
    in_groups = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert in_groups == adapters
    assert {id(p) for p in engine.optimizer.state} == adapters


def test_merged_weights_give_the_adapted_models_logits():
    cfg = cfg_of("--lora.target_modules=[\"wq\", \"wv\", \"w2\"]")
    engine = local_engine(cfg)
    train_steps(engine, cfg, 3)
    state = engine.model.state_dict()
    kept = {k: v.clone() for k, v in state.items()}
    merged = merge_lora(state, cfg)
    plain = build_model(cfg.model)
    assert merged.keys() == plain.state_dict().keys()
    plain.load_state_dict(merged)
    assert all(torch.equal(state[k], kept[k]) for k in state)  # the input state dict is left as it was
    x = torch.randint(5, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted, ours = engine.model.eval()(x), plain.eval()(x)
    assert not torch.allclose(merged["layers.0.attention.wq.weight"], state["layers.0.attention.wq.base_layer.weight"])
    torch.testing.assert_close(ours, adapted, atol=1e-5, rtol=0)


def test_adapters_start_from_the_seed_with_b_zero():
    a, b = (local_engine(cfg_of()).model.state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not a["layers.0.attention.wq.lora_A.default.weight"].eq(0).all()
    assert a["layers.0.attention.wq.lora_B.default.weight"].eq(0).all()


@pytest.mark.parametrize(("overrides", "message"), [
    (("--parallel.tp=2",), r"parallel.tp=2, pp=1"),
    (("--parallel.engine=deepspeed", "--parallel.zero_stage=3"), r"zero_stage=3.*zero_stage<=2"),
    (("--lora.target_modules=[\"wq\", \"q_proj\"]",), r"unknown names \['q_proj'\]; use names from \['wq'"),
])
def test_unsupported_settings_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg_of(*overrides)


def test_a_zero2_lora_checkpoint_refuses_another_data_parallel_size(tmp_path):
    cfg = cfg_of("--parallel.engine=deepspeed", "--parallel.zero_stage=2")
    with pytest.raises(CheckpointError, match=r"LoRA run \(lora.rank=4\) saved with parallel.zero_stage=2 resumes "
                                              r"only with the saved number of processes"):
        check_supported(tmp_path, cfg, cfg)


def test_resume_refuses_another_lora_shape(tmp_path):
    with pytest.raises(CheckpointError, match=r"lora.rank=4 but this run has lora.rank=8"):
        check_compatible(cfg_of(), cfg_of("--lora.rank=8"), tmp_path)
