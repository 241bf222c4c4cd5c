"""`unmask distill CONFIG --teacher CHECKPOINT [--section.key=value ...]`."""

from __future__ import annotations

import argparse

from unmask.cli import add_config_arguments, load_command_config

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--teacher", metavar="CHECKPOINT",
                   help="the trained diffusion model (mdlm for sdtt and masked_consistency, duo for dcd): a run dir "
                        "or checkpoints/step-* folder (same as "
                        "--distill.teacher=...); the student starts from its weights")


def run(args: argparse.Namespace) -> int:
    cfg = load_command_config(args)
    from unmask.distill.stage import distill

    distill(cfg, teacher=args.teacher)
    return 0
