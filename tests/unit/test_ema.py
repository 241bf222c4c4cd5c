"""The weight EMA: MDLM's warm-up formula, the update count, and the swap that restores the raw weights exactly."""

from __future__ import annotations

import pytest
import torch

from unmask.engines.base import LocalWeights
from unmask.errors import CheckpointError
from unmask.train.ema import EMA, warmup_decay


def weights(*tensors: torch.Tensor):
    local = LocalWeights({f"w{i}": t for i, t in enumerate(tensors)})
    return lambda: local


def test_warmup_decay_is_mdlms():
    assert warmup_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.9999, 8) == pytest.approx(9 / 18)
    assert warmup_decay(0.5, 100) == 0.5  # the configured decay caps it


def test_update_follows_the_formula_and_counts():
    w = torch.zeros(4)
    ema = EMA(weights(w), 0.9)
    expected = torch.zeros(4, dtype=torch.float64)
    for n in range(1, 40):
        w.copy_(torch.full((4,), float(n)))
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * n
        assert ema.updates == n
    assert torch.allclose(ema.shadow["w0"].double(), expected, rtol=1e-6)
    assert ema.shadow["w0"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_applied_swaps_in_the_ema_and_restores_bit_identically(dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype)
    ema = EMA(weights(a, b), 0.99)
    raw_a, raw_b = a.clone(), b.clone()
    a.add_(torch.randn(5, 3, generator=g).to(dtype))
    ema.update()
    raw_a = a.clone()
    with ema.applied():
        assert torch.equal(a, ema.shadow["w0"].to(dtype)) and torch.equal(b, ema.shadow["w1"].to(dtype))
        assert not torch.equal(a, raw_a)
        a.mul_(3)  # whatever happens inside (it is validation: nothing should), the raw weights come back
    assert torch.equal(a, raw_a) and torch.equal(b, raw_b)


def test_decay_outside_the_open_interval_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(weights(torch.zeros(1)), 1.0)


def test_save_and_load_round_trip(tmp_path):
    w = torch.arange(6.0)
    ema = EMA(weights(w), 0.9)
    w.add_(1.0)
    ema.update()
    ema.save(tmp_path)
    other = EMA(weights(w), 0.9)
    other.load(tmp_path)
    assert other.updates == 1 and torch.equal(other.shadow["w0"], ema.shadow["w0"])


def test_a_checkpoint_without_ema_starts_from_the_weights(tmp_path):
    w = torch.arange(3.0)
    ema = EMA(weights(w), 0.9)
    w.add_(5.0)
    ema.update()
    with pytest.warns(UserWarning, match="has no EMA"):
        ema.load(tmp_path)
    assert ema.updates == 0 and torch.equal(ema.shadow["w0"], w)


def placed(w: torch.Tensor, kind: str, dp_rank: int, dp: int):
    local = LocalWeights({"w0": w}, kind=kind, dp_rank=dp_rank, dp=dp, shapes={"w0": [2 * w.numel()]})
    return lambda: local


def test_whole_weights_are_saved_once_and_found_under_any_data_parallel_size(tmp_path):
    w = torch.zeros(3)
    EMA(placed(w, "full", 0, 2), 0.9).save(tmp_path)
    replica = EMA(placed(w, "full", 1, 2), 0.9)
    replica.shadow["w0"].fill_(7.0)  # a replica that differs: writing it would show
    replica.save(tmp_path)
    assert [p.name for p in (tmp_path / "ema").iterdir()] == ["tp00-pp00-dp00000.pt"]
    for dp_rank, dp in ((1, 2), (3, 4), (0, 1)):  # the same layout, and two other data-parallel sizes
        resumed = EMA(placed(w, "full", dp_rank, dp), 0.9)
        resumed.shadow["w0"].fill_(1.0)
        resumed.load(tmp_path)
        assert torch.equal(resumed.shadow["w0"], torch.zeros(3))


def test_zero3_partitions_are_saved_per_data_parallel_rank(tmp_path):
    for r in (0, 1):
        EMA(placed(torch.full((3,), float(r)), "zero3", r, 2), 0.9).save(tmp_path)
    assert sorted(p.name for p in (tmp_path / "ema").iterdir()) == ["tp00-pp00-dp00000.pt", "tp00-pp00-dp00001.pt"]
    resumed = EMA(placed(torch.zeros(3), "zero3", 1, 2), 0.9)
    resumed.load(tmp_path)
    assert torch.equal(resumed.shadow["w0"], torch.ones(3))


def test_a_saved_ema_of_another_shape_is_refused(tmp_path):
    EMA(weights(torch.zeros(3)), 0.9).save(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit"):
        EMA(weights(torch.zeros(4)), 0.9).load(tmp_path)
