"""Load a trained model for inference from either a training checkpoint (sharded ones consolidated) or an
exported Hugging Face folder, with a text codec for its tokenizer. Used by `unmask sample` and `unmask eval`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unmask.config import Config, ModelConfig
from unmask.data.special import SpecialTokens
from unmask.errors import CheckpointError, ConfigError


class Codec:
    """encode(text) -> ids and decode(ids) -> text, over sentencepiece or a Hugging Face tokenizer.json."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.suffix == ".model":
            from unmask.data.tokenizer import Tokenizer

            sp = Tokenizer(self.path)
            self.encode, self.decode = sp.encode, sp.decode
        else:
            from transformers import PreTrainedTokenizerFast

            # tokenizer.json directly: AutoTokenizer would load the folder's remote-code config (and prompt)
            file = self.path if self.path.suffix == ".json" else self.path / "tokenizer.json"
            tok = PreTrainedTokenizerFast(tokenizer_file=str(file))
            self.encode = lambda text: tok.encode(text, add_special_tokens=False)
            self.decode = lambda ids: tok.decode(ids, skip_special_tokens=False)


@dataclass
class Loaded:
    model: nn.Module  # plain model, eval mode
    model_cfg: ModelConfig
    special: SpecialTokens
    codec: Codec
    objective: str  # "mdlm", "bd3lm", "duo" or "ar" (an export's: from its attention; duo needs its config)
    schedule: str
    source: Path
    config: Config | None = None  # the run's config (checkpoints only)
    weights: str = "raw"  # "ema" when a checkpoint's EMA of the weights was loaded


def pick_device(name: str) -> torch.device:
    """`auto` -> the first GPU when there is one, else the CPU; `cpu`, `cuda`, `cuda:N` as given, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def load(path: str | Path, device: str | torch.device = "cpu", weights: str = "auto") -> Loaded:
    """A run dir, a checkpoints/step-* folder, or an `unmask export` folder (has config.json). `weights` (training
    checkpoints): "auto" the run's EMA of the weights when it kept one, else the raw weights; "ema"; "raw"."""
    path = Path(path)
    if (path / "config.json").is_file():
        return _load_export(path, device)
    from unmask.checkpoint.consolidate import chosen_weights, load_model, resolve

    used = chosen_weights(resolve(path), weights)
    cfg, model, special, tokenizer = load_model(path, device=device, weights=used)
    return Loaded(model, cfg.model, special, Codec(tokenizer), cfg.diffusion.objective, cfg.diffusion.schedule,
                  path, cfg, used)


def _load_export(path: Path, device) -> Loaded:
    import json

    from unmask.model.build import build_model
    from unmask.model.hf.init import read_folder
    from unmask.model.hf.lazy import load_into

    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "unmask":
        raise CheckpointError(f"{path} holds a {config.get('model_type')!r} model; sample from an `unmask export` "
                              "folder or a training checkpoint (import BERT/RoBERTa with `unmask train --init-from`)")
    fields, state, special = read_folder(path)
    model_cfg = ModelConfig(**fields)
    causal, block_size = bool(config.get("causal", False)), int(config.get("block_size", 0))
    model = build_model(model_cfg, causal=causal, device=device, block_size=block_size)
    load_into(model, state)  # state is read lazily, one tensor at a time
    return Loaded(model.eval(), model_cfg, special, Codec(path), "ar" if causal else "bd3lm" if block_size else "mdlm",
                  config.get("noise_schedule", "loglinear"), path)
