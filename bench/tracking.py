"""Cost of mlflow tracking per training step: the Tracker's blocking cost (enqueueing a metrics row) and its
background cost (the thread writing rows to the sqlite store), against the step time of the `small` preset.

Overhead per step = (enqueue + one store round trip for a row logged alone) / step time / log_every. The
background write runs beside training, so counting it in full is the worst case (a core busy with it is a
core training lacks); rows that pile up share a round trip (the batched figure).
Also prints the one-off cost of `start` (importing mlflow, creating the sqlite store). Asserts nothing.

    python bench/tracking.py [--rows 200] [--batch 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unmask.config import load_config
from unmask.data.special import SpecialTokens
from unmask.diffusion.noise import BatchKey
from unmask.engines import build_components
from unmask.parallel.dims import ParallelDims
from unmask.tracking import Tracker


def step_seconds(batch: int, seq_len: int, steps: int = 3) -> float:
    cfg = load_config(None, ["--model.size=small", f"--train.micro_batch_size={batch}", f"--train.seq_len={seq_len}"])
    torch.manual_seed(0)
    engine = build_components(cfg, ParallelDims(), torch.device("cpu"), SpecialTokens()).engine
    x0 = torch.randint(5, cfg.model.vocab_size, (batch, seq_len))
    times = []
    for step in range(steps + 1):  # the first is warm-up
        t0 = time.perf_counter()
        engine.train_step([x0], [BatchKey(step, global_batch=batch)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    step = step_seconds(args.batch, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, ["--tracking.enabled=true", "--model.size=small"])
        tracker = Tracker(cfg, Path(tmp), enabled=True)
        t0 = time.perf_counter()
        tracker.start()
        start = time.perf_counter() - t0
        row = {"step": 0, "tokens": 0, "loss": 3.0, "lr": 1e-3, "grad_norm": 0.5, "skipped_steps": 0,
               "tokens_per_s": 400.0, "model_tflops": 0.05, "mfu": 0.5, "peak_mem_gib": 1.2}
        enqueue = []
        t_all = time.perf_counter()
        for i in range(args.rows):
            t0 = time.perf_counter()
            tracker.log_metrics({**row, "step": i, "loss": 3.0 / (i + 1)}, i)
            enqueue.append(time.perf_counter() - t0)
        tracker.close()
        total = time.perf_counter() - t_all
        from mlflow.entities import Metric

        alone = []  # what the background thread pays when each row arrives on its own (the usual case)
        for i in range(20):
            metrics = [Metric(k, float(v), int(time.time() * 1000), 10_000 + i) for k, v in row.items() if k != "step"]
            t0 = time.perf_counter()
            tracker.client.log_batch(tracker.run_id, metrics=metrics, synchronous=True)
            alone.append(time.perf_counter() - t0)
    batched = total / args.rows  # enqueue + background write, all rows drained by close()
    per_row = statistics.median(enqueue) + statistics.median(alone)
    print(f"small preset step ({args.batch} x {args.seq_len} tokens, {args.threads} thread(s)): {step:.2f} s")
    print(f"Tracker.start (import mlflow, create the sqlite store, log params): {start:.1f} s once per run")
    print(f"log_metrics blocking cost: {statistics.median(enqueue) * 1e6:.0f} us per row (median of {args.rows})")
    print(f"background write of a row of {len(row) - 1} metrics: {statistics.median(alone) * 1e3:.1f} ms alone, "
          f"{batched * 1e3:.2f} ms when {args.rows} rows share round trips")
    for every in (1, 10):
        print(f"overhead at log_every={every:<2}: {per_row / every / step:.3%} of step time "
              f"(blocking part {statistics.median(enqueue) / every / step:.4%})")


if __name__ == "__main__":
    main()
