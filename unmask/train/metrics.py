"""Per-step bookkeeping: metrics.jsonl rows, throughput and model FLOPs utilisation."""

from __future__ import annotations

import functools
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from unmask.plan.gpus import GPUS


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
    """Tokens/s and achieved model TFLOP/s between two log points; MFU too when the peak is known.

    `tokens` added are global (all ranks), so MFU divides by the peak of all `devices` (the world size)."""

    def __init__(self, flops_per_token: int, peak_flops: float | None = None, devices: int = 1):
        self.flops_per_token, self.peak_flops, self.devices = flops_per_token, peak_flops, devices
        self.reset()

    def reset(self) -> None:
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        self.reset()
        row = {"tokens_per_s": round(tps, 1), "model_tflops": round(tps * self.flops_per_token / 1e12, 4)}
        if self.peak_flops:
            row["mfu"] = round(tps * self.flops_per_token / (self.peak_flops * self.devices), 5)
        return row


def gpu_kind(name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; None for a GPU not in the table."""
    name = name.lower()
    return next((kind for kind in GPUS if kind in name), None)


def device_peak_flops(device: str | torch.device, dtype: str) -> float | None:
    """Peak dense matmul FLOP/s of one device for dtype "fp32" or "bf16": the table for A100/H100/H200, a
    measured matmul for the CPU (cached; ~1 s once), None for an unknown GPU (MFU is then left out)."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_matmul_flops(dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = gpu_kind(name)
        if kind is None:
            return None
        peak = GPUS[kind][dtype]
        return peak * 756 / 989 if kind == "h100" and "pcie" in name.lower() else peak  # PCIe: lower clocks
    return None


@functools.cache
def cpu_matmul_flops(dtype: str) -> float:
    """Best-of-3 FLOP/s of a 1024^3 `F.linear` on this CPU with torch's current threads. `F.linear` (x @ w.T),
    the call every projection makes, not `a @ b`: without bf16 units, oneDNN's bf16 kernels differ by
    layout (~7x apart here), and MFU should be against the kernel the model runs."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    n = 1024
    a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
    torch.nn.functional.linear(a, b)  # warm-up: thread pool, packing buffers
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_memory_bytes() -> int:
    """Peak memory of this rank: CUDA max allocated on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def unigram_entropy(batches: list[torch.Tensor], pad_id: int) -> float:
    """Entropy (nats) of the empirical token distribution: what a model ignoring all context achieves."""
    tokens = torch.cat([b.flatten() for b in batches])
    tokens = tokens[tokens != pad_id]
    p = torch.bincount(tokens).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def perplexity(nats: float) -> float:
    return math.exp(min(nats, 700.0))
