"""A checkpoint (any engine, any layout) -> a Hugging Face folder (`export`; `write_model` writes its loadable
part from weights in memory), and the exported model in this process (`hf_model`). The command around it is
unmask.export.cli (`unmask export`).

The folder holds model.safetensors, config.json (auto_map for AutoConfig, AutoModel, AutoModelForMaskedLM),
the files of unmask.core byte for byte (torch + transformers only: the exported model runs the very code unmask
trains and samples with), tokenizer.json, the sampler defaults (config.json "sampler", read by
`diffusion_generate`) and a model card. It is written into a hidden folder beside --out and
renamed into place when complete, so a failure at any point leaves --out as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import unmask.core
from unmask.errors import CheckpointError

CORE = Path(unmask.core.__file__).parent
# Every file of the folder (the wrapper's relative imports reach most of them); only the package marker stays.
CODE_FILES = tuple(sorted(p.name for p in CORE.glob("*.py") if p.name != "__init__.py"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_MAP = {"AutoConfig": "configuration_unmask.UnmaskConfig", "AutoModel": "modeling_unmask.UnmaskModel",
            "AutoModelForMaskedLM": "modeling_unmask.UnmaskForMaskedLM"}


def export(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False,
           sampler: dict | None = None, weights: str = "auto") -> Path:
    """Write the Hugging Face folder `out` from `checkpoint`; returns `out`. `weights`: "auto" the run's EMA of the
    weights when the checkpoint has one, else the raw weights; "ema"; "raw" (unmask.checkpoint.consolidate)."""
    from unmask.checkpoint.consolidate import (
        chosen_weights,
        find_tokenizer,
        load_checkpoint_weights,
        resolve,
        special_tokens,
    )

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"--out {out} exists and is not an empty folder; pass --force to replace it")
    step = resolve(checkpoint)
    weights = chosen_weights(step, weights)
    cfg, state = load_checkpoint_weights(step, weights=weights)  # every check before anything is written
    sampler = sampler_defaults(cfg, sampler or {})
    tokenizer = find_tokenizer(cfg)
    special = special_tokens(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".tmp-export-{out.name}-*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write(tmp, cfg, state, special, tokenizer, step, dtype, sampler or {}, weights)
        if out.exists():  # --force: move the old folder aside first so a rename failure loses nothing
            old = out.parent / f".old-export-{out.name}-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hf_config(cfg, special, dtype: str = "fp32", sampler: dict | None = None):
    """The UnmaskConfig of a run config, with every auto_map entry set (save_pretrained would write one)."""
    from unmask.core.configuration_unmask import UnmaskConfig

    m = cfg.model
    sampler = sampler_defaults(cfg, sampler or {})
    config = UnmaskConfig(
        arch=m.arch, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.kv_heads, ffn_dim=m.ffn_dim,
        vocab_size=m.vocab_size, max_seq_len=m.max_seq_len, rope_theta=m.rope_theta, norm_eps=m.norm_eps,
        time_conditioning=m.time_conditioning, cond_dim=m.cond_dim, init_std=m.init_std, qkv_bias=m.qkv_bias,
        shift_logits=m.shift_logits,
        causal=cfg.causal, block_size=cfg.block_size, tie_word_embeddings=m.tie_embeddings, mask_token_id=special.mask,
        pad_token_id=special.pad, bos_token_id=special.bos, eos_token_id=special.eos, unk_token_id=special.unk,
        noise_schedule=cfg.diffusion.schedule, sampler=sampler, diffusion_process=diffusion_process(cfg))
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["UnmaskForMaskedLM"]
    config.dtype = str(DTYPES[dtype]).removeprefix("torch.")
    return config


def diffusion_process(cfg) -> str:
    """config.json's `diffusion_process`: which diffusion the exported samplers follow (the network cannot tell)."""
    return "uniform" if cfg.diffusion.objective == "duo" else "masked"


def sampler_defaults(cfg, sampler: dict) -> dict:
    """config.json's sampler defaults: an autoregressive run's `diffusion_generate` decodes left to right, with its
    exact KV cache, unless told otherwise; a diffusion sampler would fail on it at every call, so it is refused here."""
    kind = sampler.get("kind", "ar" if cfg.causal else "ancestral")
    if diffusion_process(cfg) == "uniform" and kind != "ancestral":
        raise CheckpointError(f"sampler kind {kind!r} does not decode a uniform-state (duo) run: its sampler is "
                              "ancestral (with noise_removal greedy or ancestral); leave kind out")
    if diffusion_process(cfg) == "masked" and "noise_removal" in sampler:
        raise CheckpointError("sampler noise_removal is the last step of a uniform-state (duo) run's sampler; this "
                              "is a masked-diffusion run: leave it out")
    if cfg.causal != (kind == "ar"):
        run = "autoregressive (diffusion.objective = 'ar')" if cfg.causal else "masked-diffusion"
        raise CheckpointError(f"sampler kind {kind!r} does not decode this {run} run: leave the sampler out (ar for "
                              "an autoregressive run, ancestral otherwise) or pick one for this kind of run")
    return {"kind": "ar", "kv_cache": "prefix", **sampler} if cfg.causal else dict(sampler)


def write_model(folder: Path, cfg, state: dict[str, torch.Tensor], special, dtype: str = "fp32",
                sampler: dict | None = None) -> int:
    """The loadable part of an export: model.safetensors, config.json and the unmask.core files, into `folder`
    (plain keys in `state`). Returns the number of stored parameters (a tied output is stored once)."""
    from safetensors.torch import save_file

    from unmask.model.hf.adapter import to_hf

    weights = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_hf(state, cfg.model.tie_embeddings).items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder / "model.safetensors", 0o666 & ~umask)  # safetensors writes it 0600, unlike every other file
    hf_config(cfg, special, dtype, sampler).to_json_file(str(folder / "config.json"))
    for name in CODE_FILES:
        shutil.copyfile(CORE / name, folder / name)
    return sum(v.numel() for v in weights.values())


def _write(tmp: Path, cfg, state, special, tokenizer: Path, step: Path, dtype: str, sampler: dict,
           weights: str = "raw") -> None:
    from unmask.data.tokenizer import export_hf_tokenizer
    from unmask.export.card import model_card

    n_params = write_model(tmp, cfg, state, special, dtype, sampler)
    export_hf_tokenizer(tokenizer, tmp)
    add_chat_template(tmp, cfg)
    meta = json.loads((step / "meta.json").read_text())
    (tmp / "README.md").write_text(model_card(cfg, meta, step, special, n_params, weights))


def add_chat_template(folder: Path, cfg) -> None:
    """An instruction-tuned run (trained on `prepare-data --format chat` shards) exports its chat template in
    tokenizer_config.json, so `tokenizer.apply_chat_template` and the model's `chat` render prompts as training did."""
    from unmask.data.chat import jinja_template, trained_template

    template, _ = trained_template(cfg)
    if template is None:
        return
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = jinja_template(template)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def hf_model(cfg, state: dict[str, torch.Tensor], special):
    """The exported model class, in this process, holding `state` (plain keys): what `export` writes, unsaved."""
    from unmask.core.modeling_unmask import UnmaskForMaskedLM
    from unmask.model.hf.adapter import to_hf

    model = UnmaskForMaskedLM(hf_config(cfg, special))
    missing, unexpected = model.load_state_dict(to_hf(state, cfg.model.tie_embeddings), strict=False)
    tied_ok = cfg.model.tie_embeddings and missing == ["model.output.weight"]
    if unexpected or (missing and not tied_ok):
        raise CheckpointError(f"weights do not fit the exported model: missing {missing}, unexpected {unexpected}")
    return model.eval()
