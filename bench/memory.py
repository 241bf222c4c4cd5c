"""Per-rank memory at DP=2 for ZeRO 0-3, measured against the planner (unmask/plan/memory.py).

What is measured, on each of 2 gloo ranks running the real DeepSpeed engine in fp32:
  states      bytes of parameters, gradients, fp32 master partition and Adam state this rank holds at its
              optimizer step (bench/parallel.py's MemoryProbe: a step pre-hook walking the engine's tensors,
              each storage once);
  activations bytes of the tensors autograd saves for backward during one micro-batch's forward (saved-tensor
              hooks; parameters excluded, each storage once).
The planner's estimate of the same two quantities is printed beside them. Not in either: the loss's transient
logits, DeepSpeed's communication buckets and ZeRO-3's gathered weights (the planner lists those separately),
allocator slack and the Python/torch runtime; peak RSS is printed for scale. At ZeRO 1 the probe sees the
gradient partition only (the full gradient was freed after its reduce-scatter), while the planner counts the
full gradient that lives through backward. Prints figures; asserts nothing (tests/distributed checks 20%).

    python bench/memory.py [--size small] [--micro 4] [--seq-len 128] [--stages 0,1,2,3]

With --layouts one,tp2,pp2,zero3: the peak RSS of every rank while building the model and taking one step, per
layout, against the one-process run and the planner's build peak and total (sharded construction, issue 14;
tests/distributed/test_memory_sharded.py asserts on the same figures).

    python bench/memory.py --layouts one,tp2,pp2,zero3 [--size 350m] [--vocab 1024] [--seq-len 32]

With --lora RANK: the same DP=2 measurement of the same model with and without LoRA adapters of that rank on every
block projection (issue 20), side by side per ZeRO stage (0-2; LoRA refuses ZeRO-3): parameters, gradients and
optimizer state (fp32 masters included) at the optimizer step, their sum, and each launch's peak RSS, with the
LoRA / full ratios. Each (stage, LoRA or not) is its own launch, so each peak RSS is that run's own.

    python bench/memory.py --lora 8 [--size small] [--stages 0,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parallel import MemoryProbe  # noqa: E402


def make_cfg(size: str, zero: int, micro: int, seq_len: int, lora: int = 0):
    from unmask.config import load_config

    return load_config(None, [f"--model.size={size}", f"--model.max_seq_len={max(seq_len, 256)}",
                              f"--train.micro_batch_size={micro}", f"--train.seq_len={seq_len}",
                              "--optim.warmup_steps=0", "--parallel.engine=deepspeed", f"--parallel.zero_stage={zero}",
                              f"--lora.rank={lora}", f"--lora.alpha={2.0 * max(lora, 1)}"])


class SavedTensors:
    """Bytes of distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.storages = model, {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        params = {p.data.untyped_storage().data_ptr() for p in self.model.parameters()}  # ZeRO-3 swaps p.data
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes():
            self.storages[s.data_ptr()] = s  # keeping it alive keeps its address unique
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())


def measure(size: str, zero: int, micro: int, seq_len: int, lora: int = 0) -> dict:
    """One rank's states and activations after a warm-up step (Adam's state exists from the first step)."""
    from unmask.data.special import SpecialTokens
    from unmask.diffusion.noise import BatchKey
    from unmask.engines import build_components
    from unmask.parallel.dims import setup_parallel

    cfg = make_cfg(size, zero, micro, seq_len, lora)
    dims = setup_parallel(cfg)
    torch.manual_seed(0)
    special = SpecialTokens()
    eng = build_components(cfg, dims, torch.device("cpu"), special).engine
    probe = MemoryProbe()
    base = getattr(eng.ds.optimizer, "optimizer", eng.ds.optimizer)
    base.register_step_pre_hook(lambda opt, a, k: probe(eng, opt))
    x0 = torch.randint(5, cfg.model.vocab_size, (micro, seq_len), generator=torch.Generator().manual_seed(dims.rank))
    key = lambda step: BatchKey(step, 0, dims.dp_rank, dims.dp, micro * dims.dp)  # noqa: E731
    eng.train_step([x0], [key(0)])
    saved = SavedTensors(eng.ds.module)
    with saved.hooks():
        eng.train_step([x0], [key(1)])
    return {"states": sum(probe.bytes.values()), "kinds": probe.bytes, "activations": saved.bytes}


def worker(args) -> None:
    import resource

    torch.set_num_threads(1)
    import peft  # noqa: F401  (its import, transformers included, counts in both the full and the LoRA peak RSS)

    result = {z: measure(args.size, z, args.micro, args.seq_len, args.lora or 0) for z in args.stages}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = [None, None]
    import torch.distributed as dist

    dist.all_gather_object(rows, {"result": result, "rss": rss})
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(rows))
    from unmask.parallel.dims import teardown_parallel

    teardown_parallel()


def run_ranks(size: str, micro: int, seq_len: int, stages: list[int], lora: int = 0) -> list[dict]:
    """Launch the 2-rank measurement; returns each rank's {"result": {stage: ...}, "rss": bytes}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--out", str(out), f"--size={size}", f"--micro={micro}", f"--seq-len={seq_len}",
               f"--stages={','.join(map(str, stages))}", f"--lora={lora}"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
        proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def planned(size: str, zero: int, micro: int, seq_len: int) -> tuple[float, float]:
    """The planner's (states, activations) bytes for the measured run."""
    from unmask.plan.memory import Layout, estimate

    mem = estimate(make_cfg(size, zero, micro, seq_len), Layout(dp=2, zero=zero, micro=micro), gpu=False)
    return mem.model_states, mem.activations


# Sharded construction (issue 14): peak RSS per rank while building and taking one step, per layout.
LAYOUTS = {  # name: (processes, config overrides)
    "one": (1, ["--parallel.engine=local"]),
    "tp2": (2, ["--parallel.engine=deepspeed", "--parallel.tp=2", "--parallel.zero_stage=0"]),
    "pp2": (2, ["--parallel.engine=deepspeed", "--parallel.pp=2", "--parallel.zero_stage=0"]),
    "zero3": (2, ["--parallel.engine=deepspeed", "--parallel.zero_stage=3"]),
}


def layout_cfg(size: str, vocab: int, seq_len: int, layout: str, dtype: str = "fp32"):
    from unmask.config import load_config

    return load_config(None, [f"--model.size={size}", f"--model.vocab_size={vocab}", f"--train.seq_len={seq_len}",
                              f"--train.dtype={dtype}",
                              "--train.micro_batch_size=1", "--train.grad_accum=1", "--optim.warmup_steps=0",
                              "--model.tie_embeddings=false", *LAYOUTS[layout][1],  # pp > 1 needs untied
                              *(["--parallel.zero_stage=1"] if layout == "pp2" and dtype == "bf16" else [])])


def rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe_construction() -> list[int]:
    """Record the peak RSS when the engine's model construction returns (before DeepSpeed's own buffers):
    wraps the three builders the engines call. Returns the list the mark is appended to."""
    import unmask.engines.build as b
    import unmask.engines.deepspeed as d
    import unmask.engines.pipeline as p

    marks: list[int] = []

    def wrap(module, name):
        inner = getattr(module, name)

        def probed(*args, **kwargs):
            out = inner(*args, **kwargs)
            marks.append(rss_peak())
            return out

        setattr(module, name, probed)

    wrap(b, "build_sharded_model")  # local engine, and the DeepSpeed engine's non-ZeRO-3 share
    wrap(d, "build_zero3_model")
    wrap(p, "build_pipeline_module")  # its LayerSpecs build this stage's layers
    return marks


def layout_worker(args) -> None:
    """One rank: peak RSS after imports, after building the engine, and after one training step."""
    import torch.distributed as dist

    from unmask.data.special import SpecialTokens
    from unmask.diffusion.noise import BatchKey
    from unmask.engines import build_components
    from unmask.parallel.dims import setup_parallel, teardown_parallel

    torch.set_num_threads(1)
    cfg = layout_cfg(args.size, args.vocab, args.seq_len, args.layout, args.dtype)
    dims = setup_parallel(cfg)
    import deepspeed  # noqa: F401  (the runtime's own footprint counts in "start" for every layout)

    start = rss_peak()
    marks = probe_construction()
    eng = build_components(cfg, dims, torch.device("cpu"), SpecialTokens()).engine
    built = rss_peak()
    x0 = torch.randint(5, cfg.model.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(dims.rank))
    eng.train_step([x0], [BatchKey(0, 0, dims.dp_rank, dims.dp, dims.dp)])
    row = {"start": start, "model": marks[0], "build": built, "step": rss_peak()}
    rows = [row]
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
    if dims.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    teardown_parallel()  # a rank leaving with its groups alive can abort at exit while its peer still runs


def run_layout(layout: str, size: str = "350m", vocab: int = 1024, seq_len: int = 32,
               dtype: str = "fp32") -> list[dict]:
    """Launch `layout` (LAYOUTS) with torchrun; returns per rank {"start", "build", "step"} peak RSS bytes."""
    nproc = LAYOUTS[layout][0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rss.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               "--layout-worker", "--out", str(out), f"--size={size}", f"--vocab={vocab}", f"--seq-len={seq_len}",
               f"--layout={layout}", f"--dtype={dtype}"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
        # A fixed mmap threshold: glibc otherwise raises it to 32 MB after the first large free, and freed
        # per-parameter tensors then stay in the heap (fragmentation of the order of GBs, varying per layout).
        env = {**env, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def planned_layout(layout: str, size: str = "350m", vocab: int = 1024, seq_len: int = 32, dtype: str = "fp32"):
    """The planner's Memory for `layout` (CPU: no CUDA overhead)."""
    from unmask.plan.memory import Layout, estimate

    cfg = layout_cfg(size, vocab, seq_len, layout, dtype)
    return estimate(cfg, Layout.from_config(cfg, LAYOUTS[layout][0]), gpu=False)


def print_layouts(size: str, vocab: int, seq_len: int, layouts: list[str], dtype: str) -> None:
    gib = 2**30
    print(f"model {size} (vocab {vocab}), {dtype}, one step of 1 x {seq_len} tokens; per-rank GiB, largest rank. "
          "measured = peak RSS (runtime included) after imports, model construction, DeepSpeed's initialize and "
          "one step; planned = the planner's build peak and training total (+ runtime: the max of both)")
    print(f"{'layout':>6} {'runtime':>8} {'model':>8} {'engine':>8} {'step':>8} {'x one':>6} | {'planned build':>13} "
          f"{'planned total':>13} {'+ runtime':>9}")
    base = None
    for name in layouts:
        rows = run_layout(name, size, vocab, seq_len, dtype)
        top = max(rows, key=lambda r: r["step"])
        base = base or (top["step"] if name == "one" else None)
        mem = planned_layout(name, size, vocab, seq_len, dtype)
        ratio = f"{top['step'] / base:6.2f}" if base else "     -"
        print(f"{name:>6} {top['start'] / gib:8.2f} {top['model'] / gib:8.2f} {top['build'] / gib:8.2f} "
              f"{top['step'] / gib:8.2f} {ratio} | "
              f"{mem.build / gib:13.2f} {mem.total / gib:13.2f} {(mem.peak + top['start']) / gib:9.2f}")


def print_lora(size: str, micro: int, seq_len: int, stages: list[int], rank: int) -> None:
    """Full training against LoRA of `rank` on the same model, per ZeRO stage: rank 0's states and peak RSS."""
    from unmask.model.counting import param_count

    mib = 2**20
    cfg = make_cfg(size, 0, micro, seq_len, rank)
    trainable = sum(2 * rank * (i + o) for i, o in lora_shapes(cfg))
    print(f"model {size} ({param_count(cfg.model) / 1e6:.1f}M parameters), DP=2 (gloo, 2 processes), fp32, "
          f"micro-batch {micro} x {seq_len} tokens; LoRA rank {rank} on {cfg.lora.target_modules} of every block "
          f"({trainable / 1e6:.3f}M trainable). MiB per rank (rank 0), full / LoRA (ratio)")
    print(f"{'ZeRO':>4} {'params':>26} {'grads':>26} {'optimizer+master':>26} {'states':>26} {'peak RSS':>26}")
    for z in stages:
        full, lora = (run_ranks(size, micro, seq_len, [z], r)[0] for r in (0, rank))
        cells = []
        for pick in (lambda r: r["kinds"]["params"], lambda r: r["kinds"]["grads"],
                     lambda r: r["kinds"]["optimizer"] + r["kinds"]["master"], lambda r: r["states"]):
            a, b = pick(full["result"][str(z)]), pick(lora["result"][str(z)])
            cells.append((a, b))
        cells.append((full["rss"], lora["rss"]))
        text = [f"{a / mib:8.2f} / {b / mib:8.2f} ({b / a if a else float('nan'):4.2f})" for a, b in cells]
        print(f"{z:>4} " + " ".join(f"{t:>26}" for t in text))
    print("params counts every model tensor (the frozen base included); peak RSS includes torch, DeepSpeed and "
          "Python, and activations, which LoRA does not shrink")


def lora_shapes(cfg) -> list[tuple[int, int]]:
    """(in, out) features of every adapted linear layer of the model `cfg` builds."""
    from unmask.model.build import build_model

    model = build_model(cfg.model, device="meta")
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rpartition(".")[2] in cfg.lora.target_modules]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--micro", type=int, default=4, help="micro-batch per rank")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--stages", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3])
    p.add_argument("--layouts", type=lambda s: s.split(","),
                   help=f"instead: peak RSS per rank of building + one step for these of {list(LAYOUTS)} "
                        "(default model 350m, vocab 1024, seq 32)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary for --layouts")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="train.dtype for --layouts")
    p.add_argument("--lora", type=int, metavar="RANK",
                   help="instead: full training against LoRA adapters of this rank, per ZeRO stage (default 0,2)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.layout_worker:
        return layout_worker(args)
    if args.lora:
        stages = [z for z in args.stages if z < 3] if args.stages != [0, 1, 2, 3] else [0, 2]
        return print_lora(args.size, args.micro, args.seq_len, stages, args.lora)
    if args.layouts:
        size = "350m" if args.size == "small" else args.size
        seq = 32 if args.seq_len == 128 else args.seq_len
        return print_layouts(size, args.vocab, seq, args.layouts, args.dtype)
    ranks = run_ranks(args.size, args.micro, args.seq_len, args.stages)
    mib = 2**20
    print(f"model {args.size}, DP=2 (gloo, 2 processes), fp32, micro-batch {args.micro} x {args.seq_len} tokens; "
          "MiB per rank, measured / planned (ratio)")
    print(f"{'ZeRO':>4} {'states':>24} {'activations':>24} {'states+activations':>24}")
    for z in args.stages:
        r = ranks[0]["result"][str(z)]
        ps, pa = planned(args.size, z, args.micro, args.seq_len)
        cells = [(r["states"], ps), (r["activations"], pa), (r["states"] + r["activations"], ps + pa)]
        text = [f"{m / mib:7.2f} / {q / mib:7.2f} ({q / m:4.2f})" for m, q in cells]
        print(f"{z:>4} {text[0]:>24} {text[1]:>24} {text[2]:>24}")
    print(f"for scale, rank 0's peak RSS over all stages (torch, DeepSpeed, Python included): "
          f"{ranks[0]['rss'] / mib:.0f} MiB")
    print("rank 1 states/activations equal rank 0's:",
          all(ranks[1]["result"][str(z)]["states"] == ranks[0]["result"][str(z)]["states"] for z in args.stages))


if __name__ == "__main__":
    main()
