"""`unmask train ... --init-from HF_DIR`: start a run from the weights of a Hugging Face folder.

The folder is an `unmask export` (continue pretraining or fine-tune), a BERT/RoBERTa `*ForMaskedLM`, or a
Llama/Mistral/Qwen2 causal LM folder or GGUF file (unmask.model.hf.causal), the last two turned into diffusion LMs by
training them with a diffusion objective. The folder fixes the architecture: its
model fields replace the run's `[model]` section; everything else (objective, data, optimizer) is the run's.
Optimizer state, data position and step counters start fresh; a run that resumes from its own checkpoint
ignores the folder (the checkpoint's weights are newer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from unmask.config import Config, ModelConfig
from unmask.data.special import SpecialTokens
from unmask.errors import CheckpointError, ConfigError
from unmask.model.hf.lazy import LazyState

# UnmaskConfig field -> ModelConfig field (the rest have the same name)
_RENAMED = {"tie_word_embeddings": "tie_embeddings"}


def _read_unmask(folder: Path, config: dict) -> tuple[dict, LazyState, SpecialTokens]:
    from safetensors import safe_open

    from unmask.model.hf.adapter import plain_key

    fields = {_RENAMED.get(k, k): v for k, v in config.items()
              if _RENAMED.get(k, k) in ModelConfig.model_fields and k != "size"}
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded save_pretrained output: the index says which file holds each key
        where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        where = {}
    files = sorted(set(where.values())) or [folder / "model.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: weight file(s) {missing} missing; re-run `unmask export`")
    if not where:
        with safe_open(str(files[0]), framework="pt") as f:  # reads the header only
            where = {k: files[0] for k in f.keys()}
    # Read on demand: a rank then holds its share plus one full tensor in transit (unmask.model.hf.lazy).
    sources = {plain_key(k): (f, k) for k, f in where.items()}
    if config.get("tie_word_embeddings"):  # stored once, as the embeddings (to_hf)
        sources["output.weight"] = sources["tok_embeddings.weight"]
    special = SpecialTokens(pad=config["pad_token_id"], unk=config.get("unk_token_id", 1),
                            bos=config["bos_token_id"], eos=config["eos_token_id"], mask=config["mask_token_id"])
    return fields, LazyState(sources), special


def read_folder(hf_dir: str | Path) -> tuple[dict, Mapping[str, torch.Tensor], SpecialTokens]:
    """(ModelConfig fields, plain fp32 state, special tokens) of an unmask export, a BERT/RoBERTa MLM or a
    Llama-family causal LM (a folder or a .gguf file; see unmask.model.hf.causal). A folder with safetensors
    gives a `LazyState` (each tensor read when asked for, so a sharded build holds its share plus one tensor in
    transit); a GGUF file, or a folder transformers must load itself, gives a dict."""
    from unmask.model.hf.adapter import from_bert, from_roberta
    from unmask.model.hf.causal import ARCHITECTURES, from_causal_lm

    folder = Path(hf_dir)
    if folder.suffix == ".gguf":
        return from_causal_lm(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"--init-from {folder}: no config.json there; pass a folder written by `unmask "
                              "export` or by save_pretrained of a BERT/RoBERTa masked LM or a Llama/Mistral/Qwen2 "
                              "causal LM, or a .gguf file")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}); re-export the folder") from None
    kind = config.get("model_type")
    readers = {"unmask": lambda: _read_unmask(folder, config), "roberta": lambda: from_roberta(folder),
               "bert": lambda: from_bert(folder), **{k: lambda: from_causal_lm(folder) for k in ARCHITECTURES}}
    if kind not in readers:
        raise CheckpointError(f"--init-from {folder}: model_type {kind!r} has no adapter; supported: "
                              f"{sorted(readers)}")
    return readers[kind]()


def init_from(hf_dir: str | Path, cfg: Config) -> tuple[Mapping[str, torch.Tensor], dict]:
    """(plain state to load into the model, read lazily for an export (see `read_folder`), ModelConfig fields
    that replace cfg.model). Checks the folder's special ids and vocabulary against the run's training shards,
    when their manifest is there."""
    fields, state, special = read_folder(hf_dir)
    manifest = Path(cfg.data.train_dir) / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        shard_special = SpecialTokens.from_dict(data["special_tokens"])
        if shard_special != special:
            raise ConfigError(f"--init-from {hf_dir} uses special ids {special.to_dict()} but the shards in "
                              f"{cfg.data.train_dir} use {shard_special.to_dict()}: tokenize the data with the "
                              "model's tokenizer")
        if data["vocab_size"] > fields["vocab_size"]:
            raise ConfigError(f"the shards in {cfg.data.train_dir} have a {data['vocab_size']}-token vocabulary but "
                              f"--init-from {hf_dir} has {fields['vocab_size']} embedding rows")
    return state, fields


def with_model(cfg: Config, fields: dict) -> Config:
    """cfg with its [model] section replaced by `fields` (validated; one ConfigError line if it does not fit)."""
    from pydantic import ValidationError

    from unmask.config import describe

    data = cfg.model_dump()
    # shift_logits is how the run reads the network (AR adaptation), not a property of the source's weights: kept.
    data["model"] = {**fields, "shift_logits": cfg.model.shift_logits}
    if cfg.diffusion.objective == "duo" and not fields.get("time_conditioning"):
        # Uniform-state diffusion reads t: an untimed source (mdlm, AR) gains time conditioning (with_time_conditioning)
        data["model"].update(time_conditioning=True, cond_dim=cfg.model.cond_dim)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"--init-from: {describe(e)}") from None


def with_time_conditioning(state: Mapping[str, torch.Tensor], cfg: Config) -> Mapping[str, torch.Tensor]:
    """`state` plus fresh time-conditioning weights (the time embedding, every block's adaLN) where the source has
    none and cfg.model asks for them (a duo run from an mdlm or AR export), drawn by the model's own init rule and
    seed, except that each adaLN's gate biases are 1 instead of adaLN-zero's 0 (which would make every block the
    identity): shift and scale 0 and gates 1 are the untimed block, so the network computes exactly what the source
    did, for any t, until training moves them."""
    from collections import ChainMap

    from unmask.model.build import build_model, param_seed

    if not cfg.model.time_conditioning:
        return state
    model = build_model(cfg.model, causal=cfg.causal, block_size=cfg.block_size, device="meta")
    fresh = {}
    for name, p in model.named_parameters():
        if name not in state and (name.startswith("time_embedding.") or ".adaln." in name):
            full = torch.empty(p.shape, dtype=torch.float32)
            model.init_parameter(name, full, torch.Generator().manual_seed(param_seed(cfg.train.seed, name)))
            if name.endswith(".adaln.bias"):  # [shift1, scale1, gate1, shift2, scale2, gate2] (Block.forward)
                full.view(6, -1)[[2, 5]] = 1.0
            fresh[name] = full
    return ChainMap(fresh, state) if fresh else state
