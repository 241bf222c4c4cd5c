"""Layout validation: every impossible layout fails before any process group, with one line naming the fix."""

import pytest
import torch

from unmask.config import Config
from unmask.errors import ConfigError
from unmask.parallel.dims import ParallelDims, setup_parallel, validate_layout


def cfg(parallel=None, model=None, train=None) -> Config:
    return Config.model_validate({"model": {"size": "tiny", **(model or {})}, "parallel": parallel or {},
                                  "train": {"seq_len": 32, **(train or {})}})


DS = {"engine": "deepspeed"}


@pytest.mark.parametrize("world, parallel, model, train, words", [
    (3, {**DS, "tp": 2}, {}, {}, ["world size 3", "parallel.tp * parallel.pp"]),
    (2, {**DS, "tp": 2}, {"n_heads": 3, "dim": 96, "n_kv_heads": 3}, {}, ["model.n_heads=3", "parallel.tp=2"]),
    (2, {**DS, "tp": 2}, {"n_kv_heads": 1}, {}, ["model.n_kv_heads=1", "parallel.tp=2"]),
    (4, {**DS, "tp": 4}, {"vocab_size": 514, "n_kv_heads": 4}, {}, ["model.vocab_size=514", "parallel.tp=4"]),
    (2, {**DS, "tp": 2}, {"ffn_dim": 191}, {}, ["model.ffn_dim=191"]),
    (3, {**DS, "pp": 3}, {}, {}, ["model.n_layers=2", "parallel.pp=3"]),
    (2, {}, {}, {}, ["world size=2", "parallel.engine"]),
    (1, {"tp": 1, "zero_stage": 2}, {}, {}, ["parallel.zero_stage=2", "deepspeed"]),
    (1, {**DS, "cpu_offload": True}, {}, {}, ["parallel.cpu_offload", "zero_stage"]),
    (2, {**DS, "pp": 2, "zero_stage": 2}, {}, {}, ["parallel.zero_stage=2", "parallel.pp=2"]),
    (2, {**DS, "pp": 2}, {}, {"dtype": "bf16"}, ["train.dtype=bf16", "zero_stage=1"]),
    (2, {**DS, "pp": 2}, {"tie_embeddings": True}, {}, ["model.tie_embeddings"]),
])
def test_bad_layout_is_one_clear_line(world, parallel, model, train, words):
    with pytest.raises(ConfigError) as e:
        validate_layout(cfg(parallel, model, train), world, gpu=False)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_good_layouts_infer_dp():
    assert validate_layout(cfg({**DS, "tp": 2, "pp": 2}), 8, gpu=False).dp == 2
    assert validate_layout(cfg({**DS, "zero_stage": 3}), 4, gpu=False).dp == 4
    assert validate_layout(cfg(), 1, gpu=False) == ParallelDims()


def test_rank_layout_matches_megatron_order():
    # tp fastest, then dp, then pp: rank = tp_rank + tp * (dp_rank + dp * pp_rank)
    coords = [(d.tp_rank, d.dp_rank, d.pp_rank) for d in (ParallelDims(dp=2, tp=2, pp=2, rank=r) for r in range(8))]
    assert coords == [(t, d, p) for p in range(2) for d in range(2) for t in range(2)]
    assert [ParallelDims(dp=2, tp=2, pp=2, rank=r).is_main for r in range(8)] == [True] + [False] * 7


def test_setup_fails_before_any_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3"):
        setup_parallel(cfg({**DS, "tp": 2}))
    assert not torch.distributed.is_initialized()


def test_local_single_process_needs_no_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    dims = setup_parallel(cfg())
    assert (dims.dp, dims.dp_rank, dims.is_main) == (1, 0, True)
    assert not torch.distributed.is_initialized()


def test_cpu_rng_tracker_forks_and_restores():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from unmask.parallel.rng import install_cpu_rng_tracker

    install_cpu_rng_tracker(seed=7, tp_rank=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    with get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the stream advances
    install_cpu_rng_tracker(seed=7, tp_rank=1)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a)  # and is reproducible per (seed, tp rank)
