"""Per-step bookkeeping: metrics.jsonl rows, throughput and model FLOPs utilisation."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


class MetricsLog:
    """Appends one JSON object per row to `metrics.jsonl` (a resumed run keeps appending)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class Throughput:
    """Tokens/s and achieved model TFLOP/s between two log points."""

    def __init__(self, flops_per_token: int):
        self.flops_per_token = flops_per_token
        self.reset()

    def reset(self) -> None:
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        self.reset()
        return {"tokens_per_s": round(tps, 1), "model_tflops": round(tps * self.flops_per_token / 1e12, 4)}


def unigram_entropy(batches: list[torch.Tensor], pad_id: int) -> float:
    """Entropy (nats) of the empirical token distribution: what a model ignoring all context achieves."""
    tokens = torch.cat([b.flatten() for b in batches])
    tokens = tokens[tokens != pad_id]
    p = torch.bincount(tokens).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def perplexity(nats: float) -> float:
    return math.exp(min(nats, 700.0))
