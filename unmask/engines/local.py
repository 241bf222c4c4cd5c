"""The local engine: plain PyTorch in one process, the reference every parallel layout is tested against."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from unmask.config import Config
from unmask.engines.base import LocalWeights, StepStats, autocast, unpack
from unmask.engines.optim import build_optimizer, build_scheduler


class LocalEngine:
    """One process: torch AdamW, LR schedule, accumulation, clipping, fp32 or bf16 autocast."""

    def __init__(self, model: nn.Module, objective, cfg: Config):
        self.model, self.objective, self.cfg = model, objective, cfg
        self.device = next(model.parameters()).device
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.forward = torch.compile(model) if cfg.train.compile else model

    def train_step(self, micro_batches, keys) -> StepStats:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch, key in zip(micro_batches, keys, strict=True):
            x0, extra = unpack(batch, self.device)
            with autocast(self.cfg.train.dtype, self.device):
                out = self.objective.loss(self.forward, x0, key, **extra)
            (out.loss / len(micro_batches)).backward()
            total += out.loss.item()
        clip = self.cfg.optim.grad_clip or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        lr = self.scheduler.get_last_lr()[0]
        loss = total / len(micro_batches)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepStats(loss, grad_norm, lr, skipped=True)
        self.optimizer.step()
        self.scheduler.step()
        return StepStats(loss, grad_norm, lr)

    @torch.no_grad()
    def eval_terms(self, x0, time_samples, key):
        self.model.eval()
        x0, extra = unpack(x0, self.device)
        with autocast(self.cfg.train.dtype, self.device):
            return self.objective.eval_terms(self.forward, x0, time_samples, key, **extra)

    def all_reduce_dp(self, values: list[float]) -> list[float]:
        return list(values)  # one process is the whole data-parallel group

    def local_weights(self) -> LocalWeights:
        return LocalWeights({n: p.data for n, p in self.model.named_parameters() if p.requires_grad})

    def save(self, directory: str, tag: str) -> None:
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(directory) / tag / "engine.pt")

    def load(self, directory: str, tag: str) -> None:
        self.load_state_dict(torch.load(Path(directory) / tag / "engine.pt", weights_only=True,
                                        map_location=self.device))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
