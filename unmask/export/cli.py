"""`unmask export --checkpoint CKPT --out DIR`: a checkpoint -> a Hugging Face folder (unmask.export.hf)."""

from __future__ import annotations

import argparse

from unmask.export.hf import DTYPES, export


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step-* folder, or a run dir (its newest valid)")
    p.add_argument("--out", required=True, help="the folder to write (must be empty or absent unless --force)")
    p.add_argument("--raw-weights", action="store_true",
                   help="a training checkpoint's raw weights, not its EMA of them (kept when train.ema_decay > 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype of model.safetensors")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--sampler", choices=["ancestral", "remask", "threshold", "ar"], default=None,
                   help="default sampler (default: ar for an autoregressive run, else ancestral)")
    p.add_argument("--steps", type=int, default=64, help="default sampling steps")


def run(args: argparse.Namespace) -> int:
    out = export(args.checkpoint, args.out, dtype=args.dtype, force=args.force,
                 sampler={"steps": args.steps, **({"kind": args.sampler} if args.sampler else {})},
                 weights="raw" if args.raw_weights else "auto")
    print(f"unmask: exported {args.checkpoint} to {out}")
    return 0
