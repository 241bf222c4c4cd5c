"""AdamW with parameter groups and a warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from unmask.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (projections, embeddings) decay; norms, biases and other vectors do not."""
    decay, no_decay = [], []
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim  # a ZeRO-3 partition is flat: its full shape
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # An empty group (LoRA trains matrices only) is dropped: DeepSpeed's ZeRO optimizers drop it themselves, and the
    # LR schedule built on the torch optimizer would then have one rate more than groups.
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # fused: one kernel per step on CPU and CUDA, with no partition-sized temporaries (the for-each and
    # single-tensor paths allocate sqrt(v) and the update: 2 x 4 bytes per parameter on a ZeRO flat partition).
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.adam_eps, fused=True)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def set_peak_lr(scheduler, peak: float) -> None:
    """Make `peak` the schedule's peak lr from the current step on (resume with a new lr, or a rollback's scaled
    lr); the warmup/decay shape is unchanged. A loaded scheduler state would otherwise keep its old base lr."""
    scheduler.base_lrs = [peak] * len(scheduler.base_lrs)
    lrs = [peak * fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
