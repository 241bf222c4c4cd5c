"""Llama-family causal LMs -> the unmask backbone (`unmask train --init-from FOLDER_OR_GGUF`), no weight lost.

Supported: `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` (its q/k/v biases become
`model.qkv_bias`), from a `save_pretrained` folder or a GGUF file. transformers reads the source: `AutoConfig` for
the architecture, the folder's safetensors (one tensor at a time, `LazyState`) or, for GGUF and folders without
safetensors, the model transformers loads itself (its GGUF loader dequantizes and un-permutes llama.cpp's q/k rows).

Key map (HF -> unmask): embed_tokens -> tok_embeddings, q/k/v/o_proj -> attention.wq/wk/wv/wo, gate/up/down_proj ->
feed_forward.w1/w3/w2, input_layernorm -> attention_norm, post_attention_layernorm -> ffn_norm, norm -> norm,
lm_head -> output (or tied). Rotary embeddings are the same rotate-half layout on both sides. Refused, naming the
config field: RoPE scaling (rope_type other than default), partial rotary, head_dim != hidden/heads, biases other
than Qwen2's q/k/v, activations other than SiLU. A sliding window caps max_seq_len at the window, within which
attention is the full causal one.

`<mask>`: unmask's objectives need a token the text never produces. Like Dream (Qwen2.5's `<|mask|>` sits in the
embedding rows past the tokenizer), the first row past the tokenizer's vocabulary is used when the checkpoint has
spare rows; otherwise one row is appended (DiffuGPT), initialised to the mean of the existing rows in the input
embeddings and in an untied output. Reusing a real token as the mask (DiffuLLaMA's id 811) would make that token
ambiguous in text, so it is not done. The source's logits are the first `vocab_size` columns of unmask's, unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from unmask.data.hf_tokenizer import special_of
from unmask.data.special import SpecialTokens
from unmask.errors import CheckpointError
from unmask.model.hf.lazy import LazyState, safetensors_sources

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_LAYER = {  # HF decoder-layer sub-module -> unmask block sub-module
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some older folders store; recomputed from rope_theta


def plain_key(hf_key: str) -> str | None:
    """One HF causal-LM key -> unmask's plain key; None for a buffer that carries no weight."""
    if hf_key in _TOP:
        return _TOP[hf_key]
    if (m := _LAYER_KEY.match(hf_key)) and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    if _IGNORED.search(hf_key):
        return None
    raise CheckpointError(f"weight {hf_key!r} has no place in unmask's backbone; importing would lose it")


def _source(path: Path) -> tuple[Path, dict]:
    """(folder, from_pretrained keyword arguments) of a folder or a .gguf file."""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"--init-from {path}: no such GGUF file")
        return path.parent, {"gguf_file": path.name, "local_files_only": True}
    return path, {"local_files_only": True}


def _rope_theta(config, where: str) -> float:
    """rope_theta, refusing scaled or partial rotary embeddings (unmask's tables are plain RoPE)."""
    params = dict(getattr(config, "rope_parameters", None) or {})  # transformers >= 5 gathers theta and scaling here
    scaling = getattr(config, "rope_scaling", None)
    if scaling and not params:
        params = dict(scaling)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise CheckpointError(f"{where}: rope_scaling / rope_parameters rope_type={kind!r} is not implemented by "
                              "unmask's rotary tables (plain RoPE only); import a checkpoint without RoPE scaling")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{where}: partial_rotary_factor={partial}; unmask rotates every head dimension")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def model_fields(config, where: str) -> dict:
    """ModelConfig fields of a Llama/Mistral/Qwen2 config, or a CheckpointError naming the field that does not fit."""
    kind = config.model_type
    if kind not in ARCHITECTURES:
        raise CheckpointError(f"{where}: model_type {kind!r} has no causal-LM adapter; supported: "
                              f"{sorted(ARCHITECTURES)} ({', '.join(ARCHITECTURES.values())})")
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise CheckpointError(f"{where}: head_dim={head_dim} but hidden_size/num_attention_heads = {hidden}/{heads}; "
                              "unmask's attention needs head_dim * heads == hidden_size")
    if config.hidden_act != "silu":
        raise CheckpointError(f"{where}: hidden_act={config.hidden_act!r}; unmask's SwiGLU uses silu")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(config, field, False):
            raise CheckpointError(f"{where}: {field}=true; unmask's projections have no biases (only Qwen2's q/k/v)")
    max_len = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = window is not None and (layer_types is None and kind == "mistral"
                                      or layer_types is not None and "sliding_attention" in layer_types)
    if sliding:  # sequences within the window see the full causal attention the window would allow
        max_len = min(max_len, window)
    return dict(arch="unmask", dim=hidden, n_layers=config.num_hidden_layers, n_heads=heads,
                n_kv_heads=getattr(config, "num_key_value_heads", None) or heads, ffn_dim=config.intermediate_size,
                vocab_size=config.vocab_size, max_seq_len=max_len, rope_theta=_rope_theta(config, where),
                norm_eps=float(config.rms_norm_eps), tie_embeddings=bool(config.tie_word_embeddings),
                qkv_bias=kind == "qwen2", init_std=float(getattr(config, "initializer_range", 0.02)))


def load_tokenizer(path: str | Path):
    """The checkpoint's own tokenizer (a folder's tokenizer files, or the GGUF's vocabulary)."""
    from transformers import AutoTokenizer

    folder, kw = _source(Path(path))
    try:
        return AutoTokenizer.from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no tokenizer could be loaded ({str(e).splitlines()[0]}); save the model's "
                              "tokenizer beside it (tokenizer.save_pretrained(folder))") from None


def special_tokens(tok, rows: int) -> tuple[SpecialTokens, int]:
    """(special ids, embedding rows after the import) for a tokenizer and a checkpoint of `rows` embedding rows; the
    ids are those `prepare-data --tokenizer` writes into the shards (unmask.data.hf_tokenizer.special_of)."""
    size = len(tok)
    if size > rows:
        raise CheckpointError(f"the tokenizer has {size} tokens but the checkpoint only {rows} embedding rows")
    special = special_of(tok)
    return special, max(rows, special.mask + 1)


def _with_mask_row(rows: int):
    """A transform appending mean rows up to `rows` (the `<mask>` row; the mean keeps it inside the embedding cloud)."""
    def grow(t: torch.Tensor) -> torch.Tensor:
        extra = rows - t.shape[0]
        return torch.cat([t, t.mean(0, keepdim=True).expand(extra, -1)]) if extra > 0 else t
    return grow


def _loaded_state(folder: Path, kw: dict) -> dict[str, torch.Tensor]:
    """The state dict of the model transformers loads itself (GGUF: dequantized to fp32, q/k un-permuted)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def from_causal_lm(path: str | Path) -> tuple[dict, LazyState | dict[str, torch.Tensor], SpecialTokens]:
    """A Llama/Mistral/Qwen2 causal-LM folder or GGUF file -> (ModelConfig fields, plain fp32 state, special ids)."""
    from transformers import AutoConfig

    path = Path(path)
    folder, kw = _source(path)
    where = f"--init-from {path}"
    config = AutoConfig.from_pretrained(folder, **kw)
    fields = model_fields(config, where)
    special, rows = special_tokens(load_tokenizer(path), fields["vocab_size"])
    grown = rows - fields["vocab_size"]
    fields["vocab_size"] = rows
    tied = fields["tie_embeddings"]
    hf_sources = None if "gguf_file" in kw else safetensors_sources(folder)
    if hf_sources is not None:
        sources = {plain: src for k, src in hf_sources.items() if (plain := plain_key(k)) is not None}
        if tied or "output.weight" not in sources:
            if not tied:
                raise CheckpointError(f"{where}: tie_word_embeddings is false but lm_head.weight is missing")
            sources["output.weight"] = sources["tok_embeddings.weight"]
        grow = {k: _with_mask_row(rows) for k in ("tok_embeddings.weight", "output.weight")} if grown else {}
        state = LazyState(sources, grow, {k: grown for k in grow})
    else:
        state = {plain: v for k, v in _loaded_state(folder, kw).items() if (plain := plain_key(k)) is not None}
        if tied:
            state["output.weight"] = state["tok_embeddings.weight"]
        for k in ("tok_embeddings.weight", "output.weight") if grown else ():
            state[k] = _with_mask_row(rows)(state[k])
        if tied:  # one tensor, as unmask's tied parameter
            state["output.weight"] = state["tok_embeddings.weight"]
    return fields, state, special
