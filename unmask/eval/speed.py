"""Sampling speed: generated tokens per second and network evaluations (NFE) of a sampler run: any sampler
(threshold's NFE is how many steps the model's confidence took; ar's is one per generated position) and KV cache.

Wall-clock figures are for reporting only; nothing asserts on them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig, SampleResult, sample


@dataclass
class SpeedResult:
    steps: int  # steps asked for
    nfe: int  # network evaluations of one run
    seconds: float  # best wall-clock time of the timed runs
    generated_tokens: int
    tokens_per_second: float
    cache: bool
    kind: str = "ancestral"
    kv_cache: str = "none"  # the KV cache (Fast-dLLM's approximate one for diffusion, the exact one for ar)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_speed(model, template: torch.Tensor, cfg: SamplerConfig, special: SpecialTokens,
                  schedule="loglinear", repeats: int = 1, warmup: bool = True,
                  process: str = "masked") -> tuple[SpeedResult, SampleResult]:
    """Time `sample` (best of `repeats`, after one untimed warm-up run) -> (speed, the last run's samples).
    process: "uniform" for a uniform-state (duo) model."""
    if warmup:
        sample(model, *short_run(template, cfg, special), special, schedule, process=process)
    runs = [sample(model, template, cfg, special, schedule, process=process) for _ in range(max(repeats, 1))]
    best = min(runs, key=lambda r: r.seconds)
    speed = SpeedResult(cfg.steps, best.nfe, best.seconds, best.num_generated, best.tokens_per_second, cfg.cache,
                        cfg.kind, cfg.kv_cache)
    return speed, runs[-1]


def short_run(template: torch.Tensor, cfg: SamplerConfig, special: SpecialTokens) -> tuple[torch.Tensor, SamplerConfig]:
    """A warm-up of a few network calls: first-call costs (allocation, kernel choice) stay out of the timed runs.
    threshold and ar take as many calls as positions, so threshold commits a whole block per call and ar stops
    two positions past the longest prompt."""
    if cfg.kind == "ar":
        return template[:, :int((template == special.mask).long().argmax(1).max()) + 2], cfg
    return template, dataclasses.replace(cfg, steps=min(cfg.steps, 2), block_length=None, threshold=1e-9)


def speed_sweep(model, template: torch.Tensor, cfg: SamplerConfig, special: SpecialTokens,
                steps: Sequence[int], schedule="loglinear", compare_cache: bool = False,
                process: str = "masked") -> list[SpeedResult]:
    """`measure_speed` at each step count (with caching, and also without it when compare_cache)."""
    out = []
    for n in steps:
        for cache in ((True, False) if compare_cache else (cfg.cache,)):
            speed, _ = measure_speed(model, template, dataclasses.replace(cfg, steps=n, cache=cache), special,
                                     schedule, warmup=not out, process=process)
            out.append(speed)
    return out
