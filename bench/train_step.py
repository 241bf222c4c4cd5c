"""Training-step throughput and MFU of a preset (default `small`), fp32 and bf16 side by side.

MFU = model FLOPs/s (6N + attention, unmask.model.counting) / this machine's best dense-matmul peak, measured
in the same run with large square matmuls (fp32, and bf16 where the CPU has native bf16 units; without them a
bf16 matmul is emulated and far slower, so fp32 stays the reference). Prints figures; asserts nothing.

    python bench/train_step.py [--size small] [--batch 8] [--seq-len 256] [--steps 6]
"""

from __future__ import annotations

import argparse
import time

import torch

from unmask.config import load_config
from unmask.data.special import SpecialTokens
from unmask.diffusion.noise import BatchKey
from unmask.engines import build_components
from unmask.model.counting import param_count, train_flops_per_token
from unmask.parallel.dims import ParallelDims


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-reps FLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_throughput(size: str, dtype: str, batch: int, seq_len: int, steps: int) -> tuple[float, float]:
    """(tokens/s, model FLOP/s) of LocalEngine.train_step, after one warm-up step."""
    cfg = load_config(None, [f"--model.size={size}", f"--model.max_seq_len={max(seq_len, 256)}",
                             f"--train.dtype={dtype}", f"--train.micro_batch_size={batch}",
                             f"--train.seq_len={seq_len}", "--optim.warmup_steps=0"])
    torch.manual_seed(0)
    engine = build_components(cfg, ParallelDims(), torch.device("cpu"), SpecialTokens()).engine
    x0 = torch.randint(5, cfg.model.vocab_size, (batch, seq_len))
    engine.train_step([x0], [BatchKey(0, global_batch=batch)])
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        engine.train_step([x0], [BatchKey(step, global_batch=batch)])
    tps = steps * batch * seq_len / (time.perf_counter() - t0)
    return tps, tps * train_flops_per_token(cfg.model, seq_len)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    n = param_count(load_config(None, [f"--model.size={args.size}"]).model)
    print(f"preset {args.size}: {n / 1e6:.1f}M parameters, batch {args.batch} x {args.seq_len} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"{'dtype':6} {'tokens/s':>10} {'model GFLOP/s':>14} {'matmul peak GFLOP/s':>20} {'MFU':>7}")
    rows, peaks = {}, {}
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[dtype] = peak = matmul_peak(torch_dtype, n=512 if dtype == "bf16" else 2048)
        batch, seq_len, steps = args.batch, args.seq_len, args.steps
        if dtype == "bf16" and peak < 0.1 * peaks["fp32"]:
            # No native bf16 matmul on this CPU (emulated, tens of times slower): one short step, so the run
            # still finishes, and say so rather than pretend.
            batch, seq_len, steps = 1, 64, 1
            print(f"note: bf16 matmul here is {peaks['fp32'] / peak:.0f}x slower than fp32 (no native bf16 "
                  f"units); bf16 measured on 1 step of 1 x 64 tokens")
        tps, flops = step_throughput(args.size, dtype, batch, seq_len, steps)
        rows[dtype] = tps
        # MFU against the machine's best dense peak: an emulated bf16 matmul is no peak to measure against.
        best = max(peaks.values())
        print(f"{dtype:6} {tps:10.1f} {flops / 1e9:14.2f} {peak / 1e9:20.2f} {flops / best:7.1%}")
    print(f"bf16 / fp32 tokens/s: {rows['bf16'] / rows['fp32']:.3f}x")


if __name__ == "__main__":
    main()
