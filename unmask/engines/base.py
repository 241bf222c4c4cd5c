"""The one interface the step loop talks to: every engine (local, DeepSpeed ZeRO, DeepSpeed pipeline) has all of
it, so the loop never asks an engine what it can do."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import EvalTerms

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # tokens [B, L], or (tokens, prompt_mask [B, L]) (SFT)


def unpack(batch: Batch, device: torch.device) -> tuple[torch.Tensor, dict]:
    """A micro-batch as (tokens on `device`, the objective's extra keyword arguments): {"prompt_mask": ...} for an
    SFT split's (tokens, prompt_mask), nothing for a pretraining tensor, so those calls stay exactly as they were
    (and objectives that take no prompt mask, distillation's or the autoregressive one, never see one)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device), {}
    tokens, prompt_mask = batch
    return tokens.to(device), {"prompt_mask": prompt_mask.to(device)}


@dataclass
class StepStats:
    loss: float  # mean over micro-batches (and data-parallel ranks)
    grad_norm: float  # before clipping
    lr: float
    skipped: bool = False  # non-finite loss or gradient: no update was applied


@dataclass
class LocalWeights:
    """This rank's own storage of the trained weights (written in place by the EMA swap) and where it sits in the
    full model, which is what checkpoint consolidation needs to put per-rank files back together. Frozen parameters
    (a LoRA run's base) are left out: training never moves them, so their average is themselves.

    kind "full": each tensor is this rank's whole (tensor-parallel shard of a) parameter, replicated over the
    data-parallel ranks; "zero3": each tensor is this rank's flat ZeRO-3 partition, `shapes` giving the full shape.
    `sync` runs after the storage was written, for engines that keep other copies of it (ZeRO-3 gathers)."""

    tensors: dict[str, torch.Tensor]
    kind: str = "full"
    tp_rank: int = 0
    pp_stage: int = 0
    dp_rank: int = 0
    dp: int = 1
    shapes: dict[str, list[int]] = field(default_factory=dict)
    sync: Callable[[], None] | None = None

    def layout(self) -> dict:
        return {"kind": self.kind, "tp_rank": self.tp_rank, "pp_stage": self.pp_stage, "dp_rank": self.dp_rank,
                "dp": self.dp, "shapes": self.shapes}


class Engine(Protocol):
    model: nn.Module  # the trained module (tensor-parallel / pipeline-stage layers where those apply)
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def train_step(self, micro_batches: list[Batch], keys: list[BatchKey]) -> StepStats:
        """One optimizer step over this rank's micro-batches (gradient accumulation, clipping, skip if non-finite);
        an SFT micro-batch is (tokens, prompt_mask), handed to the objective (`unpack`)."""

    def eval_terms(self, x0: Batch, time_samples: int,
                   key: BatchKey | int) -> EvalTerms:
        """The objective's EvalTerms (nll summed per sequence [B], tokens [B], Monte-Carlo variance [B]) without
        gradients; on an SFT batch, of the response given the prompt."""

    def save(self, directory: str, tag: str) -> None:
        """Write this rank's engine state (model, optimizer, LR schedule) under directory/tag."""

    def load(self, directory: str, tag: str) -> None:
        """Read what `save` wrote (same layout)."""

    def all_reduce_dp(self, values: list[float]) -> list[float]:
        """Sum scalars over the data-parallel ranks (the values themselves in one process)."""

    def local_weights(self) -> LocalWeights:
        """This rank's live weight storage (what the weight EMA averages and swaps in), with its layout."""


def autocast(dtype: str | None, device: torch.device):
    """The compute dtype of a region. "fp32" disables autocast, so it holds inside an outer bf16 region too (the
    frozen fp32 teacher runs inside a bf16 training step); None keeps whatever region the caller is in."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)
