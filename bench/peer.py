"""Training tokens/s and MFU of unmask's `small` preset against a transformers masked LM of the same shape.

The peer is ModernBertForMaskedLM (pre-norm, rotary, gated MLP: the closest published encoder to unmask's
block) built from a config with random init, no hub: same width, depth, heads, vocabulary and MLP width,
global attention in every layer, SDPA attention, untied decoder, `reference_compile=False` (its default
compiles on every shape change). `--peer bert` uses BertForMaskedLM instead (GELU MLP of 1.5x the width,
the same parameter count). Both train with torch AdamW, grad clipping and, for bf16, CPU autocast; the
peer's MLM loss covers half the positions, like masked diffusion's average mask rate.

MFU = model FLOPs/s / this CPU's matmul peak, measured in the same run. Model FLOPs per token count every
matmul weight (6 per parameter: forward + backward) plus attention (12 * layers * seq_len * width), for both
models alike. Steps alternate between the two models and the median step time is used, so a machine shared
with other jobs slows both alike. On a CPU without bf16 units, bf16 matmuls are emulated (~50x slower than
fp32): bf16 then runs one step of a single sequence per model, and says so. Prints figures; asserts nothing.

One thread by default: on a 2-core machine shared with other jobs, two threads' figures swing several-fold
(one thread descheduled stalls the other at every parallel region), one thread's stay put.

    python bench/peer.py [--threads 1] [--batch 4] [--seq-len 256] [--steps 3] [--peer modernbert|bert]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from unmask.config import load_config
from unmask.data.special import SpecialTokens
from unmask.diffusion.noise import BatchKey
from unmask.engines import autocast, build_components
from unmask.model.counting import param_count, train_flops_per_token
from unmask.parallel.dims import ParallelDims

MASK_ID = SpecialTokens().mask


def unmask_step(size: str, dtype: str, batch: int, seq_len: int):
    cfg = load_config(None, [f"--model.size={size}", f"--train.dtype={dtype}", f"--train.micro_batch_size={batch}",
                             f"--train.seq_len={seq_len}", "--optim.warmup_steps=0"])
    torch.manual_seed(0)
    engine = build_components(cfg, ParallelDims(), torch.device("cpu"), SpecialTokens()).engine
    x0 = torch.randint(5, cfg.model.vocab_size, (batch, seq_len))
    counter = iter(range(10**9))
    step = lambda: engine.train_step([x0], [BatchKey(next(counter), global_batch=batch)])  # noqa: E731
    return step, train_flops_per_token(cfg.model, seq_len), param_count(cfg.model)


def peer_model(kind: str, m) -> nn.Module:
    if kind == "bert":
        from transformers import BertConfig, BertForMaskedLM

        c = BertConfig(vocab_size=m.vocab_size, hidden_size=m.dim, num_hidden_layers=m.n_layers,
                       num_attention_heads=m.n_heads, intermediate_size=m.ffn_dim * 3 // 2,
                       max_position_embeddings=m.max_seq_len, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, tie_word_embeddings=False, attn_implementation="sdpa")
        return BertForMaskedLM(c)
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    c = ModernBertConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim,
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                         max_position_embeddings=m.max_seq_len, global_attn_every_n_layers=1,
                         tie_word_embeddings=False, reference_compile=False, attn_implementation="sdpa",
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, sep_token_id=2, cls_token_id=1,
                         mask_token_id=MASK_ID)
    return ModernBertForMaskedLM(c)


def peer_step(kind: str, size: str, dtype: str, batch: int, seq_len: int):
    m = load_config(None, [f"--model.size={size}"]).model
    torch.manual_seed(0)
    model = peer_model(kind, m)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x0 = torch.randint(5, m.vocab_size, (batch, seq_len))
    masked = torch.rand(batch, seq_len, generator=torch.Generator().manual_seed(0)) < 0.5
    inputs, labels = torch.where(masked, MASK_ID, x0), torch.where(masked, x0, -100)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast(dtype, torch.device("cpu")):
            loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    matmul = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear))
    flops = 6 * matmul + 12 * m.n_layers * seq_len * m.dim
    return step, flops, sum(p.numel() for p in model.parameters())


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds / threads) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, (time.process_time() - c0) / torch.get_num_threads()


def linear_peak(dtype: str, n: int = 1024) -> float:
    """Best-of-3 FLOP/s of an n^3 F.linear, in CPU time per thread (see the module docstring)."""
    a = torch.randn(n, n, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    torch.nn.functional.linear(a, a)
    best = min(timed(lambda: torch.nn.functional.linear(a, a))[1] for _ in range(3))
    return 2 * n**3 / best


def race(steps: dict, n: int) -> dict[str, tuple[float, float]]:
    """One warm-up step each, then `n` rounds alternating the models: median (wall, CPU) seconds per step."""
    times: dict[str, list] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(n):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--peer", choices=("modernbert", "bert"), default="modernbert")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peer = {"modernbert": "ModernBertForMaskedLM", "bert": "BertForMaskedLM"}[args.peer]
    print(f"unmask {args.size} vs {peer} of the same shape, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'dtype':5} {'model':22} {'params':>7} {'tokens':>6} {'tokens/s':>9} {'at full CPU':>11} "
          f"{'GFLOP/tok':>9} {'MFU':>6}  {'peak GFLOP/s':>12}")
    ratios = {}
    peaks = {dtype: linear_peak(dtype) for dtype in ("fp32", "bf16")}
    for dtype in ("fp32", "bf16"):
        peak = peaks[dtype]
        batch, seq_len, n = args.batch, args.seq_len, args.steps
        if dtype == "bf16" and peak < peaks["fp32"]:
            batch, n = 1, 1
            print(f"note: bf16 matmul here is {peaks['fp32'] / peak:.1f}x slower than fp32 (no native bf16 "
                  f"units): bf16 is measured on 1 step of {batch} x {seq_len} tokens per model")
        models = {f"unmask {args.size}": unmask_step(args.size, dtype, batch, seq_len),
                  peer: peer_step(args.peer, args.size, dtype, batch, seq_len)}
        seconds = race({name: step for name, (step, _, _) in models.items()}, n)
        tps = {}
        for name, (_, flops, params) in models.items():
            wall, cpu = seconds[name]
            tps[name] = batch * seq_len / cpu
            print(f"{dtype:5} {name:22} {params / 1e6:6.1f}M {batch * seq_len:6} {batch * seq_len / wall:9.1f} "
                  f"{tps[name]:11.1f} {flops / 1e9:9.3f} {tps[name] * flops / peak:6.1%}  {peak / 1e9:12.2f}")
        ratios[dtype] = tps[f"unmask {args.size}"] / tps[peer]
    print(f"unmask / {peer} tokens/s at full CPU: " + ", ".join(f"{d} {r:.2f}x" for d, r in ratios.items())
          + f" (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
