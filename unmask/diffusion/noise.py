"""Layout-independent randomness for the forward process.

Every random number the objective draws for a sample (its time t, its per-token mask draws) comes from
a generator seeded by (run seed, step, the sample's index in the global batch). The same sample
therefore gets the same noise whatever the data-parallel size, micro-batch split, tensor or pipeline
layout, and after a resume: equivalence tests compare layouts exactly and no RNG state needs saving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 63) - 1


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK64


@dataclass(frozen=True)
class BatchKey:
    """Where a micro-batch sits in the global batch of a step.

    The loader deals each micro-batch round contiguously: rank r's micro-batch m of a step holds the step's
    samples (m * dp_world + r) * B + [0, B). That is the samples' position in the undivided stream, so a run
    with one rank and dp_world * B samples per micro-batch gives every sample the same index."""

    step: int
    micro: int = 0  # micro-batch index within the step (gradient accumulation)
    dp_rank: int = 0
    dp_world: int = 1
    global_batch: int = 1  # samples per step over all ranks and micro-batches

    def indices(self, batch: int) -> torch.Tensor:
        return (self.micro * self.dp_world + self.dp_rank) * batch + torch.arange(batch)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator for per-step draws shared by every rank (stream < 0 by convention)."""
    return torch.Generator().manual_seed(mix(seed, step, stream))


def per_sample_uniforms(seed: int, key: BatchKey, batch: int, length: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) draws [B, L], row i seeded by sample i's global index. Token draws by inverse CDF want float64
    (as the samplers' draws are): float32 uniforms come in steps of 2^-24, too coarse for rare tokens."""
    rows = [torch.rand(length, dtype=dtype, generator=torch.Generator().manual_seed(mix(seed, key.step, int(i))))
            for i in key.indices(batch)]
    return torch.stack(rows)


def per_sample_normals(seed: int, key: BatchKey, batch: int, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """N(0, 1) draws [B, *shape] (float32), row i seeded by sample i's global index like `per_sample_uniforms`,
    drawn on `device` (Duo's Gaussian latents are [L, V] per sample: generating them on the host would move
    gigabytes a step). The values depend on the device type's generator: CPU and CUDA runs differ, as any two
    runs on different hardware do; every layout on one device type agrees."""
    device = torch.device(device or "cpu")
    rows = []
    for i in key.indices(batch):
        g = torch.Generator(device=device).manual_seed(mix(seed, key.step, int(i)))
        rows.append(torch.randn(shape, generator=g, device=device))
    return torch.stack(rows)
