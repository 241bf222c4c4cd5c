"""Sampling speed of the `small` preset: generated tokens/s and NFE at 16, 64, 256 and 1024 steps, with and
without caching, measured side by side (same seed, so both runs produce the same tokens).

    python bench/sampling.py                       # batch 1, 64 positions (63 generated), ~1-3 min on 2 cores
    python bench/sampling.py --length 256 --batch 4 --kind remask
    python bench/sampling.py --kind threshold --block-length 32 --kv-cache dual --steps 0   # KV cache vs none
    python bench/sampling.py --kind ar --kv-cache prefix --steps 0                           # AR baseline
(threshold and ar take as many steps as they need: --steps 0 runs them once.)

Random weights: speed does not depend on training. Prints figures and ratios; asserts nothing on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from unmask.config import ModelConfig
from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig
from unmask.eval.speed import measure_speed
from unmask.model.build import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--length", type=int, default=64, help="sequence length: <bos> then length-1 masks")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--kind", default="ancestral", choices=["ancestral", "remask", "threshold", "ar"])
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--kv-cache", default=None, choices=["prefix", "dual"],
                   help="compare this KV cache against none (instead of skip-caching against none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model(ModelConfig(size=args.size), causal=args.kind == "ar").eval()
    special = SpecialTokens()
    template = torch.full((args.batch, args.length), special.mask)
    template[:, 0] = special.bos
    x = template.clone().random_(5, model.cfg.vocab_size)
    with torch.no_grad():  # one forward alone, to read the sampler's overhead against
        model(x)
        t0 = time.perf_counter()
        model(x)
        forward_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.size}: {params:.1f}M parameters, batch {args.batch} x {args.length} positions "
          f"({args.batch * (args.length - 1)} generated), {args.kind}, {torch.get_num_threads()} threads; "
          f"one forward {forward_s * 1e3:.0f} ms")
    what = f"kv_cache={args.kv_cache} vs none" if args.kv_cache else "cache vs no cache"
    print(f"{what}\n{'steps':>6} | {'cached tok/s':>12} {'NFE':>5} | {'uncached tok/s':>14} {'NFE':>5} | speed-up")
    base = SamplerConfig(kind=args.kind, seed=0, block_length=args.block_length, threshold=args.threshold)
    on, off = (dict(kv_cache=args.kv_cache), dict(kv_cache="none")) if args.kv_cache else (dict(cache=True),
                                                                                          dict(cache=False))
    start = time.perf_counter()
    for i, steps in enumerate(args.steps):
        steps = steps or base.steps  # threshold / ar: not used
        cached, a = measure_speed(model, template, dataclasses.replace(base, steps=steps, **on), special,
                                  warmup=i == 0)
        plain, b = measure_speed(model, template, dataclasses.replace(base, steps=steps, **off), special,
                                 warmup=False)
        approximate = args.kv_cache and args.kind != "ar"  # Fast-dLLM's cache reads stale keys by design
        same = "" if torch.equal(a.tokens, b.tokens) else "  (outputs differ: approximate cache)" if approximate \
            else "  (outputs differ!)"
        shown = "-" if args.kind in ("threshold", "ar") else steps  # they take as many steps as they need
        print(f"{shown:>6} | {cached.tokens_per_second:>12.1f} {cached.nfe:>5} | {plain.tokens_per_second:>14.1f} "
              f"{plain.nfe:>5} | {plain.seconds / cached.seconds:>7.2f}x{same}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
