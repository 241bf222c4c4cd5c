"""Full fp32 EMA weights, in plain keys, from the EMA files of a checkpoint (`ema/tpTT-ppPP-dpDDDDD.pt`, written
by unmask.train.ema). Each file holds that rank's average of its own weight storage and the layout of it:

- kind "full": whole parameters (local engine; DeepSpeed ZeRO 0-2, where the average is the same on every
  data-parallel rank, so data-parallel rank 0's file is read), per tensor-parallel rank and pipeline stage;
- kind "zero3": each rank's flat ZeRO-3 partition; partitions are concatenated in data-parallel rank order and the
  alignment padding cut off (`[:numel]`) before reshaping to the full shape.

Names are mapped to the plain model's as consolidate maps the engine's own files: activation checkpointing's prefix
dropped, pipeline layer names mapped by `pipeline_plain_key`, tensor-parallel shards merged by the plan.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from unmask.checkpoint.reshard import WRAPPED
from unmask.config import Config
from unmask.errors import CheckpointError


def has_ema(step: Path) -> bool:
    return any((Path(step) / "ema").glob("*.pt"))


def ema_state(step: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The checkpoint's EMA as full weights in plain keys (before consolidate's `_checked`)."""
    from unmask.checkpoint.consolidate import _merge_tp, pipeline_plain_key

    files = sorted((Path(step) / "ema").glob("*.pt"))
    by_place: dict[tuple[int, int], dict[int, dict]] = {}  # (tp rank, pp stage) -> dp rank -> file content
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)
        where = state["layout"]
        by_place.setdefault((where["tp_rank"], where["pp_stage"]), {})[where["dp_rank"]] = state
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    want = {(t, s) for t in range(tp) for s in range(pp)}
    if by_place.keys() != want:
        raise CheckpointError(f"{step}/ema holds files for (tensor rank, stage) {sorted(by_place)} but the config "
                              f"(parallel.tp={tp}, pp={pp}) needs {sorted(want)}: the checkpoint is incomplete")
    shards = []
    for t in range(tp):
        merged: dict[str, torch.Tensor] = {}
        for s in range(pp):
            for name, value in _gather_dp(by_place[(t, s)], step).items():
                name = name.replace(WRAPPED, "")
                merged[pipeline_plain_key(name, cfg.model.n_layers) if pp > 1 else name] = value
        shards.append(merged)
    return shards[0] if tp == 1 else _merge_tp(shards)


def _gather_dp(ranks: dict[int, dict], step: Path) -> dict[str, torch.Tensor]:
    """One (tensor rank, stage)'s full weights from its data-parallel ranks' files."""
    first = ranks[min(ranks)]
    layout = first["layout"]
    if layout["kind"] == "full":
        return first["tensors"]  # replicated over data-parallel ranks
    if sorted(ranks) != list(range(layout["dp"])):
        raise CheckpointError(f"{step}/ema holds ZeRO-3 partitions of data-parallel ranks {sorted(ranks)} of "
                              f"{layout['dp']}: the checkpoint is incomplete")
    out = {}
    for name, shape in layout["shapes"].items():
        flat = torch.cat([ranks[r]["tensors"][name] for r in range(layout["dp"])])
        out[name] = flat[: math.prod(shape)].view(shape)
    return out
