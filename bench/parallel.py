"""Data parallelism on this machine: tokens/s of DP=2 against one process, and per-rank ZeRO memory.

Part 1 trains the same global batch in one process (all threads) and with DeepSpeed DP=2 (ZeRO 0, one
thread per rank, gloo). Part 2 measures, at DP=2 for ZeRO 0/1/2/3, the bytes each rank holds in parameters,
gradients and optimizer state right before the optimizer step (a step pre-hook walks every tensor, counting
each storage once) and prints them next to the ZeRO paper's fp32 figures for Adam:
    params 4P, grads 4P, optimizer 8P; ZeRO-1 shards the optimizer, ZeRO-2 also grads, ZeRO-3 also params.
ZeRO 1-3 also keep an fp32 master copy of this rank's partition ("master" column): with fp32 training that
copy is extra, with bf16 it is the usual master weight. Prints figures; asserts nothing.

    python bench/parallel.py [--size small] [--batch 8] [--seq-len 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STAGES = (0, 1, 2, 3)


def make_cfg(args, engine: str, zero: int, micro: int):
    from unmask.config import load_config

    return load_config(None, [f"--model.size={args.size}", f"--model.max_seq_len={max(args.seq_len, 256)}",
                              f"--train.micro_batch_size={micro}", f"--train.seq_len={args.seq_len}",
                              "--optim.warmup_steps=0", f"--parallel.engine={engine}",
                              f"--parallel.zero_stage={zero}"])


def run(args, engine: str, zero: int, micro: int, steps: int, on_step=None) -> float:
    """Train `steps` steps (after one warm-up) on synthetic tokens; returns tokens/s over all ranks."""
    from unmask.data.special import SpecialTokens
    from unmask.diffusion.noise import BatchKey
    from unmask.engines import build_components
    from unmask.parallel.dims import setup_parallel

    cfg = make_cfg(args, engine, zero, micro)
    dims = setup_parallel(cfg)
    torch.manual_seed(0)
    special = SpecialTokens()
    eng = build_components(cfg, dims, torch.device("cpu"), special).engine
    if on_step is not None:
        base = getattr(eng.ds.optimizer, "optimizer", eng.ds.optimizer)
        base.register_step_pre_hook(lambda opt, a, k: on_step(eng, opt))
    g = torch.Generator().manual_seed(dims.dp_rank)
    x0 = torch.randint(5, cfg.model.vocab_size, (micro, args.seq_len), generator=g)
    key = lambda step: BatchKey(step, 0, dims.dp_rank, dims.dp, micro * dims.dp)  # noqa: E731
    eng.train_step([x0], [key(0)])
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        eng.train_step([x0], [key(step)])
    return steps * micro * dims.dp * args.seq_len / (time.perf_counter() - t0)


class MemoryProbe:
    """Step pre-hook on the torch optimizer. ZeRO steps it once per parameter group (swapping in one group at
    a time), so each call adds what it sees to the current step's tally; each storage counts once a step."""

    KINDS = ("params", "master", "grads", "optimizer")

    def __init__(self):
        self.step, self.seen, self.bytes = -1, set(), dict.fromkeys(self.KINDS, 0)

    def __call__(self, eng, opt) -> None:
        if eng.ds.global_steps != self.step:  # a new optimizer step: keep only the latest one
            self.step, self.seen, self.bytes = eng.ds.global_steps, set(), dict.fromkeys(self.KINDS, 0)
        model_params = list(eng.ds.module.parameters())
        for p in model_params:
            self.add("params", getattr(p, "ds_tensor", p.data))  # ZeRO-3 keeps only this rank's partition
        for group in opt.param_groups:
            for p in group["params"]:
                self.add("master", p.data)  # the model parameters themselves at ZeRO 0 (already counted)
        for p in model_params:
            self.add("grads", p.grad)
        for group in opt.param_groups:
            for p in group["params"]:
                self.add("grads", p.grad)
        for state in opt.state.values():
            for t in state.values():
                self.add("optimizer", t)

    def add(self, kind: str, t) -> None:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            return
        s = t.untyped_storage()
        if s.data_ptr() not in self.seen:
            self.seen.add(s.data_ptr())
            self.bytes[kind] += s.nbytes()


def worker(args) -> None:
    """Runs under torchrun with 2 ranks: throughput at ZeRO 0, then memory at every stage."""
    torch.set_num_threads(1)
    result: dict = {"tokens_per_s": run(args, "deepspeed", 0, args.batch // 2, args.steps), "memory": {}}
    for zero in STAGES:
        probe = MemoryProbe()  # optimizer state exists from the first step on: measure the second
        run(args, "deepspeed", zero, args.batch // 2, 1, on_step=probe)
        result["memory"][zero] = probe.bytes
    from unmask.model.counting import param_count

    result["params"] = param_count(make_cfg(args, "local", 0, 1).model)
    if int(os.environ["RANK"]) == 0:
        Path(args.out).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--batch", type=int, default=8, help="global batch (samples per step)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    threads = torch.get_num_threads()
    single = {}
    for n in sorted({threads, 1}, reverse=True):  # all threads, and one thread like each DP rank
        torch.set_num_threads(n)
        single[n] = run(args, "local", 0, args.batch, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--out", str(out), f"--size={args.size}", f"--batch={args.batch}",
               f"--seq-len={args.seq_len}", f"--steps={args.steps}"]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dp = json.loads(out.read_text())
    print(f"model {args.size}: {dp['params'] / 1e6:.2f}M parameters, global batch {args.batch} x {args.seq_len} "
          f"tokens, {os.cpu_count()} CPU cores, fp32")
    for n, tps in single.items():
        print(f"one process, {n} thread(s):      {tps:9.0f} tokens/s")
    best = max(single.values())
    print(f"DeepSpeed DP=2, 1 thread each: {dp['tokens_per_s']:9.0f} tokens/s  ({dp['tokens_per_s'] / best:.2f}x "
          "the best single process)")
    P, N, mib = dp["params"], 2, 2**20
    theory = {0: (4 * P, 4 * P, 8 * P), 1: (4 * P, 4 * P, 8 * P / N), 2: (4 * P, 4 * P / N, 8 * P / N),
              3: (4 * P / N, 4 * P / N, 8 * P / N)}
    print("\nper-rank MiB at DP=2, measured (theory):")
    print(f"{'ZeRO':>4} {'params':>16} {'grads':>16} {'optimizer':>16} {'master':>8} {'total':>16}")
    for zero in STAGES:
        m, t = dp["memory"][str(zero)], theory[zero]
        total = m["params"] + m["grads"] + m["optimizer"] + m["master"]
        kinds = ("params", "grads", "optimizer")
        cells = [f"{m[k] / mib:7.2f} ({v / mib:6.2f})" for k, v in zip(kinds, t, strict=True)]
        print(f"{zero:>4} {' '.join(f'{c:>16}' for c in cells)} {m['master'] / mib:8.2f} "
              f"{total / mib:7.2f} ({sum(t) / mib:6.2f})")


if __name__ == "__main__":
    main()
