"""`unmask plan CONFIG --gpus N --gpu h100`: parameters, per-rank memory of candidate layouts, estimated
tokens/s and time to train, and a recommended layout. Estimates only; see unmask/plan/memory.py for what the
memory model counts and tests/distributed/test_plan_memory.py for its check against measured memory."""

from __future__ import annotations

import argparse

from unmask.errors import UnmaskError

ACCEPTS_OVERRIDES = True  # --section.key=value, as for train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML config (see configs/); overrides follow as --section.key=value")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in total")
    p.add_argument("--gpu", default="h100", help="GPU kind: a100, h100 or h200")
    p.add_argument("--tokens", type=float, help="token budget (default: train.steps x the global batch)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation of a plain layout")
    p.add_argument("--seq-len", type=int, help="sequence length (default train.seq_len)")
    p.add_argument("--top", type=int, default=10, help="layouts listed (fastest that fit first)")


def gib(x: float) -> str:
    return f"{x / 2**30:6.1f}"


def duration(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f} days" if days >= 1 else f"{seconds / 3600:.1f} h"


def run(args: argparse.Namespace) -> int:
    from unmask.config import load_config
    from unmask.model.counting import param_count, train_flops_per_token
    from unmask.plan.gpus import GPUS
    from unmask.plan.layouts import candidates, global_batch
    from unmask.plan.memory import Layout

    if args.gpu not in GPUS:
        raise UnmaskError(f"--gpu {args.gpu!r} is not known; choose one of {sorted(GPUS)}")
    if args.gpus < 1 or not 0 < args.mfu <= 1:
        raise UnmaskError(f"--gpus must be >= 1 and --mfu in (0, 1]; got --gpus {args.gpus} --mfu {args.mfu}")
    cfg = load_config(args.config, list(args.overrides))
    m, t = cfg.model, cfg.train
    seq = args.seq_len or t.seq_len
    gpu = GPUS[args.gpu]
    peak = gpu[t.dtype]
    fpt = train_flops_per_token(m, seq, cfg.network_streams)
    batch = global_batch(cfg, args.gpus)
    tokens = args.tokens or t.steps * batch * seq
    found = candidates(cfg, args.gpus, gpu["memory"], peak, args.mfu, fpt, seq)
    if not found:
        raise UnmaskError(f"no (tp, pp, ZeRO, micro-batch) layout divides {args.gpus} GPUs and a global batch of "
                          f"{batch} samples; change --gpus or train.micro_batch_size/grad_accum")
    print(f"{args.config}: {param_count(m) / 1e9:.2f}B parameters, seq_len {seq}, {t.dtype}, "
          f"{args.gpus} x {args.gpu} ({gpu['memory'] / 2**30:.1f} GiB, {peak / 1e12:.0f} TFLOP/s {t.dtype})")
    print(f"global batch {batch} x {seq} = {batch * seq / 1e6:.2f}M tokens; {fpt / 1e9:.1f} GFLOP per token "
          f"(training, attention included); budget {tokens:.3g} tokens at MFU {args.mfu:.0%}")
    print("per-rank GiB: states = weights + grads + fp32 master + Adam; act = saved activations; "
          "tmp = logits transient + DeepSpeed buffers + 2 GiB CUDA/NCCL; build = construction peak (own share + "
          "one full tensor), fits if max(total, build + 2 GiB) fits")
    header = (f"  {'tp':>2} {'pp':>2} {'dp':>4} {'zero':>4} {'micro':>5} {'accum':>5} {'ckpt':>4} | {'states':>6} "
              f"{'act':>6} {'tmp':>6} {'total':>6} {'build':>6} | {'fits':>4} {'tokens/s':>10} {'time':>10}")
    print(header)
    mine = Layout.from_config(cfg, args.gpus)

    def row(c, mark=" "):
        L, mem = c.layout, c.memory
        tmp = mem.logits + mem.buffers + mem.overhead
        ckpt = "on" if L.ckpt else "off"
        print(f"{mark} {L.tp:>2} {L.pp:>2} {L.dp:>4} {L.zero:>4} {L.micro:>5} {L.accum:>5} {ckpt:>4}"
              f" | {gib(mem.model_states)} {gib(mem.activations)} {gib(tmp)} {gib(mem.total)} {gib(mem.build)} | "
              f"{'yes' if c.fits else 'no':>4} {c.tokens_per_s:10.3g} {duration(tokens / c.tokens_per_s):>10}")

    for c in found[:args.top]:
        row(c, "*" if c is found[0] and c.fits else " ")
    config_row = next((c for c in found if c.layout == mine), None)
    if config_row is not None:
        print("the config's own layout (parallel.* and train.micro_batch_size/grad_accum):")
        row(config_row, "=")
    fitting = sum(c.fits for c in found)
    print(f"{fitting} of {len(found)} candidate layouts fit in {gpu['memory'] / 2**30:.1f} GiB.")
    best = found[0]
    if not best.fits:
        print("recommended: none fits; use more GPUs, a shorter --seq-len or a smaller model")
        return 0
    L = best.layout
    print(f"recommended: --parallel.tp={L.tp} --parallel.pp={L.pp} --parallel.zero_stage={L.zero} "
          f"--train.micro_batch_size={L.micro} --train.grad_accum={L.accum} "
          f"--parallel.activation_checkpointing={'true' if L.ckpt else 'false'}  "
          f"(~{best.tokens_per_s:.3g} tokens/s, {duration(tokens / best.tokens_per_s)} for {tokens:.3g} tokens)")
    return 0
