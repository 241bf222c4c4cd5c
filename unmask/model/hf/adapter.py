"""The one key map between unmask's plain state dict and Hugging Face layouts (torchtitan's state-dict adapter).

- `to_hf` / `from_hf`: unmask <-> the exported `UnmaskForMaskedLM` (unmask/core/modeling_unmask.py), whose
  `model` is unmask's own backbone: HF key = "model." + plain key, a tied output weight stored once;
- `from_roberta` / `from_bert`: a `RobertaForMaskedLM` / `BertForMaskedLM` folder -> (ModelConfig fields for
  `arch = "bert"`, plain state dict, SpecialTokens), so the masked LM can be trained as a diffusion LM.

Plain keys are those of `unmask.core.transformer.Transformer` (or `unmask.core.bert_blocks.BertTransformer`), never
tensor-parallel shards: unmask.checkpoint.consolidate gathers shards first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from unmask.data.special import SpecialTokens
from unmask.errors import CheckpointError

# ------------------------------------------------------------------------------------------- unmask <-> HF


def to_hf(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Plain keys -> UnmaskForMaskedLM keys: "model." + key. A tied output weight is left out (transformers ties
    it back on load)."""
    return {"model." + k: v for k, v in state.items() if not (tied and k == "output.weight")}


def plain_key(hf_key: str) -> str:
    """One UnmaskForMaskedLM key -> its plain key (lm_head.* of older exports -> output.*)."""
    if hf_key.startswith("lm_head."):
        return "output." + hf_key.removeprefix("lm_head.")
    return hf_key.removeprefix("model.")


def from_hf(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """UnmaskForMaskedLM keys -> plain keys (the inverse of `to_hf`). Also reads folders exported before the
    wrapper held unmask's backbone (lm_head.* for output.*, head.* at the top)."""
    out = {plain_key(k): v for k, v in state.items()}
    if tied:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# --------------------------------------------------------------------------------------- BERT / RoBERTa -> unmask

_LAYER = {  # HF encoder layer sub-module -> unmask bert block sub-module
    "attention.self.query": "attention.wq", "attention.self.key": "attention.wk",
    "attention.self.value": "attention.wv", "attention.output.dense": "attention.wo",
    "attention.output.LayerNorm": "attention_norm", "intermediate.dense": "feed_forward.w1",
    "output.dense": "feed_forward.w2", "output.LayerNorm": "ffn_norm",
}
_HEADS = {  # family -> (backbone prefix, {HF head module -> unmask module})
    "roberta": ("roberta.", {"lm_head.dense": "head.dense", "lm_head.layer_norm": "head.norm",
                             "lm_head.decoder": "output"}),
    "bert": ("bert.", {"cls.predictions.transform.dense": "head.dense",
                       "cls.predictions.transform.LayerNorm": "head.norm", "cls.predictions.decoder": "output"}),
}
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def _mlm_config(folder: Path, family: str):
    """The folder's transformers config, refused (naming the field) where unmask's BERT blocks differ."""
    from transformers import AutoConfig

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json: pass a folder written by save_pretrained")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != family:
        raise CheckpointError(f"{folder} holds a {model_type!r} model, not {family!r}; use the matching importer")
    config = AutoConfig.from_pretrained(folder)
    if config.hidden_act != "gelu" or getattr(config, "is_decoder", False):
        raise CheckpointError(f"{folder}: hidden_act={config.hidden_act!r}, is_decoder={config.is_decoder}; unmask's "
                              "BERT blocks need the exact GELU and an encoder")
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{folder}: position_embedding_type={config.position_embedding_type!r}; only "
                              "absolute positions are supported")
    return config


def _loaded_mlm(folder: Path) -> dict[str, torch.Tensor]:
    """The state of the model transformers loads itself (folders without safetensors, or with keys the lazy map
    does not know): tying and legacy names resolved as transformers does, the whole model in memory once."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


_LEGACY = {".gamma": ".weight", ".beta": ".bias"}  # TF-era LayerNorm names (bert-base-uncased's own files)
_UNUSED = re.compile(r"(^|\.)(pooler\.|position_ids$)|^cls\.seq_relationship\.")  # not part of the MLM


def _lazy_mlm(folder: Path, family: str, tied: bool) -> dict[str, tuple[Path, str]] | None:
    """HF key (as `_from_mlm` reads it) -> (safetensors file, stored key), from the headers only; None when the
    folder has no safetensors or a key this map does not place (then transformers loads the folder whole)."""
    from unmask.model.hf.lazy import safetensors_sources

    stored = safetensors_sources(folder)
    if stored is None:
        return None
    prefix, head = _HEADS[family]
    bias = "lm_head.bias" if family == "roberta" else "cls.predictions.bias"  # the decoder's bias, stored once
    out = {}
    for key, src in stored.items():
        for old, new in _LEGACY.items():
            key = key.removesuffix(old) + new if key.endswith(old) else key
        if _UNUSED.search(key):
            continue
        module = key.rpartition(".")[0]
        known = (key.startswith(prefix + "embeddings.") or bool(_LAYER_KEY.match(key.removeprefix(prefix)))
                 or module in head or key == bias)
        if not known:
            return None
        out[key] = src
    embeddings = out.get(prefix + "embeddings.word_embeddings.weight")
    if embeddings is None:
        return None  # transformers' own load names what is missing
    decoder = next(m for m, ours in head.items() if ours == "output")
    if tied or f"{decoder}.weight" not in out:  # a tied decoder is the embedding (save_pretrained stores it once)
        out[f"{decoder}.weight"] = embeddings
    if f"{decoder}.bias" not in out and bias in out:
        out[f"{decoder}.bias"] = out[bias]
    return out


def _special(folder: Path, config) -> SpecialTokens:
    """Special ids from the folder's tokenizer, else from config attributes (`mask_token_id` among them)."""
    ids = {}
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file() or (folder / "vocab.txt").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        ids = {"pad": tok.pad_token_id, "unk": tok.unk_token_id, "bos": tok.bos_token_id or tok.cls_token_id,
               "eos": tok.eos_token_id or tok.sep_token_id, "mask": tok.mask_token_id}
    for name, attrs in {"pad": ["pad_token_id"], "unk": ["unk_token_id"], "bos": ["bos_token_id", "cls_token_id"],
                        "eos": ["eos_token_id", "sep_token_id"], "mask": ["mask_token_id"]}.items():
        for attr in attrs:
            if ids.get(name) is None:
                ids[name] = getattr(config, attr, None)
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise CheckpointError(f"{folder}: no id for the special token(s) {missing}; save the model's tokenizer in "
                              "the folder (tokenizer.save_pretrained) or set e.g. mask_token_id in config.json")
    return SpecialTokens.from_dict(ids)


def _from_mlm(folder: str | Path, family: str) -> tuple[dict, Mapping[str, torch.Tensor], SpecialTokens]:
    from unmask.model.hf.lazy import LazyState

    folder = Path(folder)
    config = _mlm_config(folder, family)
    tied = bool(config.tie_word_embeddings)
    lazy = _lazy_mlm(folder, family, tied)
    # A safetensors folder is read one tensor at a time when the model is built (a rank holds its share plus one
    # tensor in transit); otherwise transformers loads it whole.
    hf = LazyState(lazy) if lazy is not None else _loaded_mlm(folder)
    prefix, head = _HEADS[family]
    # RoBERTa numbers positions from padding_idx + 1: drop the rows before, so unmask's position i is its i + offset.
    offset = config.pad_token_id + 1 if family == "roberta" else 0
    max_len = config.max_position_embeddings - offset
    emb = prefix + "embeddings."
    places = {"tok_embeddings.weight": emb + "word_embeddings.weight",
              "emb_norm.weight": emb + "LayerNorm.weight", "emb_norm.bias": emb + "LayerNorm.bias"}
    for k in hf:
        if (m := _LAYER_KEY.match(k.removeprefix(prefix))) and m.group(2) in _LAYER:
            layer, module, kind = m.groups()
            places[f"layers.{layer}.{_LAYER[module]}.{kind}"] = k
    for hf_module, ours in head.items():
        for kind in ("weight", "bias"):
            if f"{hf_module}.{kind}" in hf:
                places[f"{ours}.{kind}"] = f"{hf_module}.{kind}"
    # Token type 0 is added at every position (inputs carry no segments): fold it into the (small) position table.
    positions = hf[emb + "position_embeddings.weight"][offset:] + hf[emb + "token_type_embeddings.weight"][0]
    if lazy is not None:
        state = LazyState({ours: lazy[k] for ours, k in places.items()} | {"pos_embeddings.weight": positions})
    else:
        state = {ours: hf[k] for ours, k in places.items()} | {"pos_embeddings.weight": positions}
        if tied and not torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
            raise CheckpointError(f"{folder}: tie_word_embeddings is set but the decoder differs from the embeddings")
    model = dict(arch="bert", dim=config.hidden_size, n_layers=config.num_hidden_layers,
                 n_heads=config.num_attention_heads, ffn_dim=config.intermediate_size, vocab_size=config.vocab_size,
                 max_seq_len=max_len, norm_eps=config.layer_norm_eps, tie_embeddings=tied,
                 init_std=config.initializer_range)
    return model, state, _special(folder, config)


def from_roberta(folder: str | Path) -> tuple[dict, Mapping[str, torch.Tensor], SpecialTokens]:
    """A RobertaForMaskedLM folder -> (ModelConfig fields, plain state dict, special tokens). Positions: unmask
    numbers every token 0..L-1 (+2 in RoBERTa's table); RoBERTa skips <pad> tokens, so logits agree exactly on
    inputs without <pad> (unmask's shards only pad the end of the last sample of a document)."""
    return _from_mlm(folder, "roberta")


def from_bert(folder: str | Path) -> tuple[dict, Mapping[str, torch.Tensor], SpecialTokens]:
    """A BertForMaskedLM folder -> (ModelConfig fields, plain state dict, special tokens); token type 0."""
    return _from_mlm(folder, "bert")
