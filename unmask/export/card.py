"""The model card (README.md) of an exported folder: architecture, data, training config, measured metrics.

Every figure comes from the checkpoint's own files (meta.json, the run's metrics.jsonl, the shards' manifest);
a figure that is not there is left out rather than guessed.
"""

from __future__ import annotations

import json
from pathlib import Path


def _last_rows(run_dir: Path, step: int) -> tuple[dict, dict]:
    """The last training row and the last validation row at or before `step` (empty dicts if none)."""
    train, val = {}, {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", step + 1) <= step:
                if "val_nelbo" in row:
                    val = row
                elif "loss" in row:
                    train = row
    return train, val


def _data(cfg) -> list[str]:
    manifest = Path(cfg.data.train_dir) / "manifest.json"
    if not manifest.is_file():
        return [f"- training shards: `{cfg.data.train_dir}` (manifest not available at export time)"]
    m = json.loads(manifest.read_text())
    kind = "sentencepiece" if cfg.tokenizer_path.suffix == ".model" else "the imported model's own (tokenizer.json)"
    return [f"- training shards: `{cfg.data.train_dir}`: {m.get('num_samples')} samples of {m.get('seq_len')} "
            f"tokens ({m.get('num_tokens')} tokens, {m.get('num_documents')} documents)",
            f"- tokenizer: {kind}, vocabulary {m.get('vocab_size')}, sha256 `{m.get('tokenizer_sha256')}`"]


def _weights(cfg, weights: str) -> str:
    if weights == "ema":
        return (f"- weights: the exponential moving average of the trained weights (decay {cfg.train.ema_decay}, "
                "MDLM's warm-up); validation rows marked `val_weights: ema` measured them")
    kept = " (the run also kept an EMA of them; export it without --raw-weights)" if cfg.train.ema_decay else ""
    return f"- weights: the raw trained weights{kept}"


def model_card(cfg, meta: dict, step_dir: Path, special, n_params: int, weights: str = "raw") -> str:
    m, objective = cfg.model, cfg.diffusion.objective
    train, val = _last_rows(step_dir.parent.parent, meta["step"])
    arch = ("post-LN BERT/RoBERTa encoder (learned positions, GELU, LayerNorm, biases)" if m.arch == "bert" else
            "pre-norm RMSNorm blocks, rotary positions, SwiGLU, no biases"
            + (", grouped-query attention" if m.kv_heads != m.n_heads else "")
            + (", adaLN time conditioning" if m.time_conditioning else ""))
    kind = {"mdlm": "masked-diffusion (MDLM ELBO)",
            "bd3lm": f"block-diffusion (BD3-LM, blocks of {cfg.diffusion.block_size})",
            "duo": "uniform-state diffusion (UDLM ELBO, Duo)"}.get(
        objective, "autoregressive baseline (causal attention)")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: fill-mask",
        "tags: [unmask, masked-diffusion, diffusion-language-model]", "---", "",
        f"# unmask {kind} language model", "",
        "Exported by `unmask export` from `" + str(step_dir) + "`.", "",
        "## Architecture", "",
        f"- {arch}",
        f"- {m.n_layers} layers, width {m.dim}, {m.n_heads} heads ({m.kv_heads} key/value), FFN {m.ffn_dim}, "
        f"vocabulary {m.vocab_size}, context {m.max_seq_len}, {n_params / 1e6:.2f}M parameters"
        + (", tied embeddings" if m.tie_embeddings else ""),
        f"- special ids: pad {special.pad}, unk {special.unk}, bos {special.bos}, eos {special.eos}, "
        f"mask {special.mask}; noise schedule `{cfg.diffusion.schedule}`",
        "", "## Data", "", *_data(cfg),
        "", "## Training", "",
        f"- {meta['step']} optimizer steps, {meta.get('tokens', 0)} tokens, layout {meta.get('layout')}",
        _weights(cfg, weights),
        "", "```toml", cfg.to_toml().strip(), "```",
        "", "## Measured metrics", "",
    ]
    if val:
        lines.append(f"- validation NELBO {val['val_nelbo']} nats/token (step {val['step']}); perplexity bound "
                     f"{val.get('val_ppl_bound')}; unigram entropy of the same tokens {val.get('val_unigram_entropy')}")
    if train:
        lines.append(f"- training loss {train['loss']:.4f} at step {train['step']}")
    if not (val or train):
        lines.append("- none recorded (the run's metrics.jsonl was not found)")
    lines += [
        "", "## Use", "", "```python",
        "import torch",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer",
        "model = AutoModelForMaskedLM.from_pretrained(PATH, trust_remote_code=True)",
        "tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # reads config.json, hence the flag",
        "ids = torch.tensor([[model.config.bos_token_id] + tok.encode('To be')])",
        "out = model.diffusion_generate(ids, max_length=64, steps=64, seed=0)  # unmask's samplers",
        "print(tok.decode(out['sequences'][0]))",
        "```", "",
        "`diffusion_generate` runs the same samplers as `unmask` (ancestral, remask, threshold, ar for an "
        "autoregressive run; blocks, guidance, top-k/top-p, KV cache) "
        "and gives the same tokens for the same seed; its defaults are `config.sampler`.", "",
    ]
    if objective == "duo":
        lines += ["This is a uniform-state model (`config.diffusion_process` \"uniform\"): `diffusion_generate` starts "
                  "its `<mask>` positions from uniformly drawn tokens, takes `steps` ancestral posterior steps and "
                  "ends with Duo's greedy tail (`noise_removal=\"ancestral\"` for a last posterior draw instead).", ""]
    return "\n".join(lines)
