"""Candidate layouts for N GPUs, their estimated speed, and the recommendation.

Speed: tokens/s = GPUs x peak x MFU / training FLOPs per token (unmask.model.counting, attention included).
The assumed MFU is that of a plain layout; two costs are applied on top because they are arithmetic, not
tuning: activation checkpointing recomputes the forward (8 instead of 6 FLOPs per parameter and token: x0.75)
and a pipeline idles (pp - 1) / (accum + pp - 1) of the time (1F1B bubble). Communication is not modelled;
ties go to the layout with less of it (smaller tp * pp, lower ZeRO stage)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from unmask.config import Config
from unmask.plan.memory import Layout, Memory, estimate

GPUS_PER_NODE = 8  # tensor parallelism stays inside a node (NVLink)


@dataclass
class Candidate:
    layout: Layout
    memory: Memory
    tokens_per_s: float
    fits: bool


def global_batch(cfg: Config, gpus: int) -> int:
    """Samples per optimizer step that the config asks for on `gpus` GPUs (held fixed across layouts)."""
    p, t = cfg.parallel, cfg.train
    return t.micro_batch_size * t.grad_accum * max(gpus // (p.tp * p.pp), 1)


def speed(layout: Layout, gpus: int, peak: float, mfu: float, flops_per_token: float) -> float:
    recompute = 0.75 if layout.ckpt else 1.0
    bubble = (layout.pp - 1) / (layout.accum + layout.pp - 1)
    return gpus * peak * mfu * recompute * (1 - bubble) / flops_per_token


def candidates(cfg: Config, gpus: int, memory_bytes: float, peak: float, mfu: float, flops_per_token: float,
               seq_len: int) -> list[Candidate]:
    """Every valid (tp, pp, ZeRO, micro-batch, checkpointing) at the config's global batch, fastest first."""
    m = cfg.model
    batch = global_batch(cfg, gpus)
    out = []
    for tp, pp, zero, micro, ckpt in itertools.product((1, 2, 4, 8), (1, 2, 4, 8), (0, 1, 2, 3), (1, 2, 4, 8, 16),
                                                       (False, True)):
        if gpus % (tp * pp) or tp > min(gpus, GPUS_PER_NODE) or m.n_layers % pp:
            continue
        if any(n % tp for n in (m.n_heads, m.kv_heads, m.ffn_dim, m.vocab_size)):
            continue
        if pp > 1 and zero > 1:  # DeepSpeed's pipeline engine supports ZeRO 0-1 only
            continue
        dp = gpus // (tp * pp)
        if zero and dp == 1 or batch % (micro * dp):
            continue
        layout = Layout(dp=dp, tp=tp, pp=pp, zero=zero, micro=micro, accum=batch // (micro * dp), ckpt=ckpt)
        mem = estimate(cfg, layout, seq_len)
        out.append(Candidate(layout, mem, speed(layout, gpus, peak, mfu, flops_per_token), mem.peak <= memory_bytes))
    return sorted(out, key=rank_key)


def rank_key(c: Candidate):
    L = c.layout
    return (not c.fits, -round(c.tokens_per_s, 6), L.tp * L.pp, L.zero, -L.micro, c.memory.total)
