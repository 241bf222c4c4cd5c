"""`unmask plot RUN_DIR`: loss.png, val.png and lr.png of a training run (see unmask/eval/curves.py)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run directory (with metrics.jsonl)")
    p.add_argument("--out", help="where the PNGs go (default RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    from unmask.eval.curves import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
