"""`unmask train CONFIG [--section.key=value ...]`."""

from __future__ import annotations

import argparse

from unmask.cli import add_config_arguments, load_command_config

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--init-from", metavar="HF_DIR",
                   help="start from the weights of an `unmask export` folder, a BERT/RoBERTa *ForMaskedLM folder, or "
                        "a Llama/Mistral/Qwen2 *ForCausalLM folder or .gguf file (its architecture replaces [model]; "
                        "optimizer and data start fresh)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def run(args: argparse.Namespace) -> int:
    if args.help_config:
        from unmask.config import config_help

        print(config_help())
        return 0
    cfg = load_command_config(args)
    from unmask.train.loop import train

    init_state = None
    if args.init_from:
        from unmask.model.hf.init import init_from, with_model, with_time_conditioning

        init_state, model_fields = init_from(args.init_from, cfg)
        cfg = with_model(cfg, model_fields)
        init_state = with_time_conditioning(init_state, cfg)
    train(cfg, init_state=init_state)
    return 0
