"""Checkpoint cost of a preset (default `small`): save time, load time (manifest verification included) and size,
and the save overhead as a percentage of training time at the checkpoint interval (default: the config default,
checkpoint.interval_steps = 500), with one optimizer step's time measured in the same run on the same engine.

The step uses synthetic tokens of the preset's vocabulary (the batch shape of configs/demo-cpu.toml by default).
Save = what the train loop does: engine files, client state, sha256 manifest, atomic rename, pruning. Load = the
resume path: choose + verify the newest checkpoint, then restore engine and client state. One process; the
DeepSpeed engine runs as a world of 1. Prints figures; asserts nothing.

    python bench/checkpoint.py [--size small] [--engine local|deepspeed] [--zero 2] [--batch 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unmask.checkpoint import Checkpointer, rng_state
from unmask.config import load_config
from unmask.data.special import SpecialTokens
from unmask.diffusion.noise import BatchKey
from unmask.engines import build_components
from unmask.model.counting import param_count
from unmask.parallel.dims import setup_parallel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--engine", choices=["local", "deepspeed"], default="local")
    ap.add_argument("--zero", type=int, default=2, help="ZeRO stage with --engine deepspeed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=3, help="saves and loads timed (the median is printed)")
    ap.add_argument("--interval", type=int, default=None, help="checkpoint.interval_steps (default: the config's)")
    args = ap.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="unmask-bench-ckpt-"))
    overrides = [f"--model.size={args.size}", f"--model.max_seq_len={max(args.seq_len, 256)}",
                 f"--train.micro_batch_size={args.batch}", f"--train.seq_len={args.seq_len}",
                 f"--train.run_dir={run_dir}", f"--parallel.engine={args.engine}", "--checkpoint.keep_last=1",
                 f"--parallel.zero_stage={args.zero if args.engine == 'deepspeed' else 0}"]
    cfg = load_config(None, overrides)
    interval = args.interval or cfg.checkpoint.interval_steps
    dims = setup_parallel(cfg)
    special = SpecialTokens()
    torch.manual_seed(0)
    engine = build_components(cfg, dims, torch.device("cpu"), special).engine

    def step(i: int) -> float:
        x = torch.randint(5, cfg.model.vocab_size, (args.batch, args.seq_len),
                          generator=torch.Generator().manual_seed(i))
        t0 = time.perf_counter()
        engine.train_step([x], [BatchKey(i, 0, 0, 1, args.batch)])
        return time.perf_counter() - t0

    step(0)  # warm-up: allocator, Adam state
    step_s = statistics.median(step(i) for i in range(1, args.steps + 1))

    ckpt = Checkpointer(run_dir, cfg.checkpoint, dims.rank, dims.world_size)
    meta = {"step": 0, "config": cfg.to_toml(), "layout": {"world": 1, "dp": 1, "tp": 1, "pp": 1}}
    client = {"loader": {"position": 0}, "rng": rng_state()}
    saves, loads, size = [], [], 0
    for r in range(1, args.repeats + 1):
        t0 = time.perf_counter()
        path = ckpt.save(r, engine, {**meta, "step": r}, client)
        saves.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        t0 = time.perf_counter()
        ckpt.load(ckpt.find("auto"), engine, cfg)
        loads.append(time.perf_counter() - t0)
    save_s, load_s = statistics.median(saves), statistics.median(loads)

    engine_name = args.engine if args.engine == "local" else f"deepspeed ZeRO-{args.zero} (world 1)"
    print(f"preset {args.size}: {param_count(cfg.model) / 1e6:.1f}M parameters, {engine_name}, fp32, "
          f"{torch.get_num_threads()} threads, batch {args.batch} x {args.seq_len} tokens")
    print(f"checkpoint size  {size / 2**20:8.1f} MiB  ({size / param_count(cfg.model):.1f} bytes/parameter: "
          "fp32 weights and Adam moments, plus the module copy under DeepSpeed)")
    print(f"save             {save_s:8.3f} s    ({size / 2**20 / save_s:.0f} MiB/s, sha256 manifest included)")
    print(f"load             {load_s:8.3f} s    (verify against manifest + restore)")
    print(f"one step         {step_s:8.3f} s")
    overhead = save_s / (interval * step_s) * 100
    print(f"save overhead at checkpoint.interval_steps={interval}: {overhead:.3f}% of training time "
          f"(one save per {interval * step_s:.0f} s of steps)")


if __name__ == "__main__":
    main()
