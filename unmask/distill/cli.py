"""`unmask distill CONFIG --teacher CHECKPOINT [--section.key=value ...]`."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (see configs/); overrides follow as --section.key=value")
    p.add_argument("--teacher", metavar="CHECKPOINT",
                   help="the trained masked-diffusion model: a run dir or checkpoints/step-* folder (same as "
                        "--distill.teacher=...); the student starts from its weights")
    p.add_argument("--resume", metavar="auto|never|PATH",
                   help="resume from the newest valid checkpoint in the run dir (auto, the default), start fresh "
                        "(never), or from a checkpoint folder")


def run(args: argparse.Namespace) -> int:
    from unmask.config import load_config

    overrides = list(args.overrides) + ([f"--checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    from unmask.distill.loop import distill
    from unmask.launcher.env import export_torch_env

    export_torch_env()  # under plain srun: RANK/WORLD_SIZE/MASTER_* from SLURM_* (no-op under torchrun)
    distill(cfg, teacher=args.teacher)
    return 0
