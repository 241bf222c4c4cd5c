"""BERT/RoBERTa masked LMs imported through the adapters compute the same logits in unmask, before training."""

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

from unmask.config import Config
from unmask.errors import CheckpointError, ConfigError
from unmask.model.build import build_model
from unmask.model.hf.adapter import from_bert, from_roberta
from unmask.model.hf.init import init_from, with_model

SHAPE = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=66)


def save(tmp_path, family: str, tie: bool = True):
    torch.manual_seed(0)
    if family == "roberta":  # RoBERTa: <s>=0 <pad>=1 </s>=2; the <mask> id normally comes from the tokenizer
        config = RobertaConfig(**SHAPE, pad_token_id=1, bos_token_id=0, eos_token_id=2, tie_word_embeddings=tie)
        model = RobertaForMaskedLM(config)
    else:
        config = BertConfig(**SHAPE, pad_token_id=0, tie_word_embeddings=tie, type_vocab_size=2)
        model = BertForMaskedLM(config)
    config.mask_token_id, config.unk_token_id, config.cls_token_id, config.sep_token_id = 98, 3, 5, 6
    with torch.no_grad():  # random LayerNorms and biases too: their defaults (1, 0) would hide a swapped key
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / family
    model.save_pretrained(folder)
    return folder, model.eval()


def unmask_model(fields, state):
    cfg = Config.model_validate({"model": fields, "train": {"seq_len": 16}})
    model = build_model(cfg.model)
    model.load_state_dict(state)
    return cfg, model.eval()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_imported_logits_equal_the_original(tmp_path, family, tie):
    folder, original = save(tmp_path, family, tie)
    fields, state, special = (from_roberta if family == "roberta" else from_bert)(folder)
    cfg, model = unmask_model(fields, state)
    assert cfg.model.arch == "bert" and cfg.model.tie_embeddings == tie
    assert special.mask == 98 and special.pad == (1 if family == "roberta" else 0)
    x = torch.randint(3, 98, (3, 64))  # no <pad>: RoBERTa would give it its own position
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x).logits, atol=1e-5, rtol=0)
    assert cfg.model.max_seq_len == (64 if family == "roberta" else 66)  # RoBERTa never uses its first two rows


def test_init_from_gives_model_fields_and_plain_weights(tmp_path):
    folder, original = save(tmp_path, "roberta")
    cfg = Config.model_validate({"model": {"size": "tiny"}, "train": {"seq_len": 16},
                                 "data": {"train_dir": str(tmp_path / "nowhere")}})
    state, fields = init_from(folder, cfg)
    new = with_model(cfg, fields)
    assert new.model.dim == 32 and new.model.size is None and new.train == cfg.train
    model = build_model(new.model)
    model.load_state_dict(state)
    x = torch.randint(3, 98, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), original(x).logits, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len=64"):
        with_model(Config.model_validate({"train": {"seq_len": 128}, "model": {"max_seq_len": 128}}), fields)


def test_init_from_refuses_mismatched_shards_and_unknown_folders(tmp_path, tiny_shards):
    folder, _ = save(tmp_path, "bert")
    cfg = Config.model_validate({"data": {"train_dir": str(tiny_shards / "train")}, "train": {"seq_len": 16}})
    with pytest.raises(ConfigError, match="special ids .* but the shards"):
        init_from(folder, cfg)
    with pytest.raises(CheckpointError, match="no config.json"):
        init_from(tmp_path / "empty", cfg)
    (tmp_path / "gpt" / "config.json").parent.mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' has no adapter"):
        init_from(tmp_path / "gpt", cfg)
    with pytest.raises(CheckpointError, match="holds a 'bert' model, not 'roberta'"):
        from_roberta(folder)


def assert_same_logits(model, original):
    x = torch.randint(3, 98, (2, 40))  # no <pad>: RoBERTa would give it its own position
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x).logits, atol=1e-5, rtol=0)


def rewrite_weights(folder, rename=lambda k: k, extra=None):
    """The folder's model.safetensors with its keys renamed and `extra` tensors added."""
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    state = {rename(k): v for k, v in load_file(file).items()} | (extra or {})
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_sharded_build_reads_each_stored_tensor_once(tmp_path, family):
    """A safetensors folder is read lazily: nothing at import but the small position tables, then each stored
    tensor once while the model is built parameter by parameter (a rank holds its share plus one in transit)."""
    from unmask.engines.build import build_sharded_model
    from unmask.model.hf.lazy import LazyState
    from unmask.parallel.dims import ParallelDims

    folder, original = save(tmp_path, family)
    fields, state, _ = (from_roberta if family == "roberta" else from_bert)(folder)
    assert isinstance(state, LazyState) and state.reads == 0
    cfg = Config.model_validate({"model": fields, "train": {"seq_len": 16}})
    model = build_sharded_model(cfg, ParallelDims(), torch.device("cpu"), init_state=state).eval()
    stored = {src for src in state.sources.values() if isinstance(src, tuple)}
    assert state.reads == len(stored)  # the tied decoder is the embedding: read once
    assert_same_logits(model, original)


def test_legacy_names_and_unused_heads_are_read_lazily_too(tmp_path):
    """bert-base-uncased's own files: LayerNorm gamma/beta, a pooler and the next-sentence head (not part of the
    masked LM) and a position_ids buffer; the import is still lazy and computes the original's logits."""
    from unmask.model.hf.lazy import LazyState

    folder, original = save(tmp_path, "bert")
    legacy = {"weight": "gamma", "bias": "beta"}
    rewrite_weights(folder, lambda k: k.rpartition(".")[0] + "." + legacy[k.rpartition(".")[2]]
                    if "LayerNorm." in k else k,
                    {"bert.pooler.dense.weight": torch.zeros(32, 32), "cls.seq_relationship.weight": torch.zeros(2, 32),
                     "bert.embeddings.position_ids": torch.arange(66)[None]})
    fields, state, _ = from_bert(folder)
    assert isinstance(state, LazyState)
    assert_same_logits(unmask_model(fields, state)[1], original)


def test_a_key_the_map_does_not_place_falls_back_to_transformers(tmp_path):
    """An unknown stored key: transformers loads the folder whole (it decides what the key means), same logits."""
    folder, original = save(tmp_path, "roberta")
    rewrite_weights(folder, extra={"roberta.unknown.weight": torch.zeros(3)})
    fields, state, _ = from_roberta(folder)
    assert isinstance(state, dict)
    assert_same_logits(unmask_model(fields, state)[1], original)
