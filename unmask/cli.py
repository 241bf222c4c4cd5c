"""`unmask <command>`: each command lives in its own module, imported only when run (start-up stays fast:
`prepare-data` never imports deepspeed)."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module defining `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "prepare-data": ("unmask.data.cli", "tokenize a corpus into packed webdataset shards"),
    "train": ("unmask.train.cli", "masked-diffusion (or autoregressive) pretraining"),
    "launch": ("unmask.launcher.cli", "print or run the torchrun command / render the sbatch script"),
    "distill": ("unmask.distill.cli", "distil a trained model into fewer sampling steps (SDTT rounds or Duo's DCD)"),
    "sample": ("unmask.diffusion.cli", "generate (continue, infill, unconditional) from a model"),
    "eval": ("unmask.eval.cli", "held-out NELBO, generative perplexity, diversity and speed of a model"),
    "export": ("unmask.export.cli", "export a checkpoint to a Hugging Face folder"),
    "plot": ("unmask.plot.cli", "PNGs of a run's loss, validation and learning-rate curves"),
    "plan": ("unmask.plan.cli", "per-rank memory and speed of parallel layouts; a recommended one"),
}


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every config-driven command (train, distill) takes; overrides follow as --section.key=value."""
    p.add_argument("config", nargs="?", help="TOML config (see configs/); overrides follow as --section.key=value")
    p.add_argument("--resume", metavar="auto|never|PATH",
                   help="resume from the newest valid checkpoint in the run dir (auto, the default), start fresh "
                        "(never), or resume from a checkpoint folder (same as --checkpoint.resume=...)")


def load_command_config(args: argparse.Namespace):
    """The validated config of a config-driven command, with rank variables exported for plain `srun`."""
    from unmask.config import load_config
    from unmask.launcher.env import export_torch_env

    overrides = list(args.overrides) + ([f"--checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    export_torch_env()  # under plain srun: RANK/WORLD_SIZE/MASTER_* from SLURM_* (no-op under torchrun)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="unmask", description="Masked-diffusion language model pretraining.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if argv and argv[0] in COMMANDS:  # build only the parser that runs
        names = [argv[0]]
    else:
        names = list(COMMANDS)
    modules = {}
    for name in names:
        module_name, help_text = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text)
        if len(names) == 1:
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(p)
    args, extra = parser.parse_known_args(argv)
    module = modules[args.command]
    if extra and not getattr(module, "ACCEPTS_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from unmask.errors import UnmaskError

    try:
        return int(module.run(args) or 0)
    except UnmaskError as e:
        print(f"unmask {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
