"""`unmask train CONFIG [--section.key=value ...]`."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (see configs/); overrides follow as --section.key=value")
    p.add_argument("--resume", metavar="auto|never|PATH",
                   help="resume from the newest valid checkpoint in the run dir (auto, the default), start fresh "
                        "(never), or resume from a checkpoint folder (same as --checkpoint.resume=...)")
    p.add_argument("--init-from", metavar="HF_DIR",
                   help="start from the weights of an `unmask export` folder or a BERT/RoBERTa *ForMaskedLM folder "
                        "(its architecture replaces [model]; optimizer and data start fresh)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def run(args: argparse.Namespace) -> int:
    from unmask.config import config_help, load_config

    if args.help_config:
        print(config_help())
        return 0
    overrides = list(args.overrides) + ([f"--checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    from unmask.launcher.env import export_torch_env
    from unmask.train.loop import train

    export_torch_env()  # under plain srun: RANK/WORLD_SIZE/MASTER_* from SLURM_* (no-op under torchrun)

    init_state = None
    if args.init_from:
        from unmask.model.hf.init import init_from, with_model

        init_state, model_fields = init_from(args.init_from, cfg)
        cfg = with_model(cfg, model_fields)
    train(cfg, init_state=init_state)
    return 0
