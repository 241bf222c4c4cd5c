"""Llama/Mistral/Qwen2 causal LMs imported into the unmask backbone give the source's logits under a causal mask
(small random configs saved locally; SmolLM2-135M from its GGUF in the slow test)."""


import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

from unmask.config import Config, ModelConfig
from unmask.errors import CheckpointError
from unmask.model.build import build_model
from unmask.model.hf.causal import from_causal_lm
from unmask.model.hf.init import init_from, read_folder, with_model
from unmask.model.hf.lazy import LazyState, load_into

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
             max_position_embeddings=64, rms_norm_eps=1e-6)
WORDS = 60  # the tokenizer's vocabulary; configs with more embedding rows have spare ones


def save_tokenizer(folder, words: int = WORDS):
    # <|endoftext|>: transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer, which adds it (as pad) if absent
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 3, **{f"w{i}": i for i in range(4, words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


VARIANTS = {  # name -> (config, tokenizer words)
    "llama-gqa-untied": (LlamaConfig(**SHAPE, vocab_size=64, num_key_value_heads=2, tie_word_embeddings=False,
                                     rope_theta=500000.0), WORDS),
    "llama-tied-full-vocab": (LlamaConfig(**SHAPE, vocab_size=WORDS, tie_word_embeddings=True), WORDS),
    "qwen2-biases-tied": (Qwen2Config(**SHAPE, vocab_size=64, num_key_value_heads=2, tie_word_embeddings=True,
                                      rope_theta=1000000.0), WORDS),
    "qwen2-biases-untied-full": (Qwen2Config(**SHAPE, vocab_size=WORDS, num_key_value_heads=4,
                                             tie_word_embeddings=False), WORDS),
    "mistral-window": (MistralConfig(**SHAPE, vocab_size=64, num_key_value_heads=1, sliding_window=48,
                                     tie_word_embeddings=False), WORDS),
}


def save(tmp_path, name: str):
    config, words = VARIANTS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases: their defaults (1, 0) would hide a swapped or dropped key
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / name
    model.save_pretrained(folder)
    save_tokenizer(folder, words)
    return folder, model.eval()


def unmask_logits(fields, state, tokens):
    model = build_model(ModelConfig(**fields), causal=True)
    load_into(model, state)
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causal_logits_equal_the_source_model(tmp_path, name):
    folder, hf = save(tmp_path, name)
    fields, state, special = read_folder(folder)
    assert isinstance(state, LazyState)  # read tensor by tensor, as an export
    rows = hf.config.vocab_size
    assert special.mask == WORDS and fields["vocab_size"] == max(rows, WORDS + 1)
    assert fields["qkv_bias"] == name.startswith("qwen2")
    assert fields["max_seq_len"] == (48 if name == "mistral-window" else 64)  # capped at the sliding window
    tokens = torch.randint(4, WORDS, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
    got = unmask_logits(fields, state, tokens)
    assert got.shape[-1] == fields["vocab_size"]
    torch.testing.assert_close(got[..., :rows], want, atol=1e-5, rtol=1e-5)


def test_the_mask_row_is_the_mean_of_the_embeddings(tmp_path):
    folder, hf = save(tmp_path, "qwen2-biases-untied-full")
    fields, state, special = from_causal_lm(folder)
    emb, out = hf.model.embed_tokens.weight, hf.lm_head.weight
    assert state.shape("tok_embeddings.weight") == [WORDS + 1, 32]
    torch.testing.assert_close(state["tok_embeddings.weight"][special.mask], emb.mean(0))
    torch.testing.assert_close(state["output.weight"][special.mask], out.mean(0))
    assert (special.bos, special.eos, special.unk, special.pad) == (1, 2, 0, 3)


def test_missing_pad_falls_back_to_eos(tmp_path):
    folder, _ = save(tmp_path, "llama-tied-full-vocab")
    assert read_folder(folder)[2].pad == 2


def test_train_init_from_gives_a_valid_config(tmp_path):
    folder, _ = save(tmp_path, "qwen2-biases-tied")
    cfg = Config.model_validate({"train": {"seq_len": 32}, "model": {"max_seq_len": 64},
                                 "data": {"train_dir": str(tmp_path / "none")}})
    state, fields = init_from(folder, cfg)
    new = with_model(cfg, fields)
    assert new.model.qkv_bias and new.model.kv_heads == 2 and new.model.rope_theta == 1e6
    assert Config.model_validate({**new.model_dump(), "parallel": {"tp": 2}}).parallel.tp == 2  # biases shard too


def test_sharded_construction_reads_each_tensor_once_and_gives_the_same_logits(tmp_path):
    """`unmask train --init-from` builds through build_sharded_model (parameter by parameter from the lazy state):
    the tied, grown embedding is read once and the logits are the eager load's."""
    from unmask.engines.build import build_sharded_model
    from unmask.parallel.dims import ParallelDims

    folder, hf = save(tmp_path, "qwen2-biases-tied")
    cfg = Config.model_validate({"train": {"seq_len": 32}, "diffusion": {"objective": "ar"},
                                 "data": {"train_dir": str(tmp_path / "none")}})
    state, fields = init_from(folder, cfg)
    model = build_sharded_model(with_model(cfg, fields), ParallelDims(), torch.device("cpu"), state)
    assert state.reads == len(state) - 1  # output.weight is the embeddings' tensor
    tokens = torch.randint(4, WORDS, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = model.eval()(tokens)[..., :hf.config.vocab_size], hf(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, field", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type='linear'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 32}), "rope_type='llama3'"),
    (dict(head_dim=16), "head_dim=16"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_refusals_name_the_field(tmp_path, change, field):
    config = LlamaConfig(**{**SHAPE, "vocab_size": 64, **change})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match=field.replace("[", r"\[")):
        read_folder(tmp_path)


def test_unknown_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        read_folder(tmp_path)


def test_export_round_trip_keeps_qkv_bias(tmp_path):
    """An imported Qwen2 model written by unmask's export loads back (config.json carries qkv_bias) with the same
    causal logits."""
    from unmask.export.hf import write_model

    folder, hf = save(tmp_path, "qwen2-biases-tied")
    fields, state, special = read_folder(folder)
    cfg = with_model(Config.model_validate({"train": {"seq_len": 32}, "diffusion": {"objective": "ar"}}), fields)
    plain = {k: state[k] for k in state}
    out = tmp_path / "export"
    out.mkdir()
    write_model(out, cfg, plain, special)
    fields2, state2, special2 = read_folder(out)
    assert fields2["qkv_bias"] and special2 == special
    tokens = torch.randint(4, WORDS, (1, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(unmask_logits(fields2, state2, tokens), unmask_logits(fields, state, tokens))


def write_corpus(tmp_path, docs: int = 12):
    rng = torch.Generator().manual_seed(3)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for d in range(docs):
        ids = torch.randint(4, WORDS, (int(torch.randint(5, 40, (1,), generator=rng)),), generator=rng)
        (folder / f"{d}.txt").write_text(" ".join(f"w{i}" for i in ids.tolist()))
    return folder


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama-tied-full-vocab"])  # spare rows; a row appended
@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_data_with_the_imported_tokenizer(tmp_path, name, workers):
    """`prepare-data --tokenizer FOLDER` writes the checkpoint's tokenizer with <mask> added; its shards carry the
    special ids --init-from derives, so the run starts from the import; the checkpoint's codec reads it back."""
    import json

    from unmask.data.prepare import PrepareOptions, prepare_data
    from unmask.data.shards import read_manifest
    from unmask.inference import Codec

    folder, _ = save(tmp_path, name)
    out = tmp_path / "data"
    prepare_data(PrepareOptions(inputs=[str(write_corpus(tmp_path))], out=out, seq_len=32, tokenizer=folder,
                                val_fraction=0.3, workers=workers, progress=False))
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.model").exists()
    fields, state, special = read_folder(folder)
    manifest = read_manifest(out / "train")
    assert manifest.special == special and manifest.vocab_size == special.mask + 1 <= fields["vocab_size"]
    cfg = Config.model_validate({"train": {"seq_len": 32}, "data": {"train_dir": str(out / "train"),
                                                                     "val_dir": str(out / "val")}})
    assert cfg.tokenizer_path == out / "tokenizer.json"
    init_from(folder, cfg)  # refuses shards whose special ids or vocabulary do not fit the model
    codec = Codec(cfg.tokenizer_path)
    assert codec.encode("w5 w6 <mask>") == [5, 6, special.mask]
    assert json.loads((out / "tokenizer_config.json").read_text())["mask_token"] == "<mask>"
    # the samples are the documents' ids (the first train sample starts with <bos>)
    from unmask.data.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(out / "tokenizer.json")
    text = (tmp_path / "corpus" / "0.txt").read_text()
    assert tok.encode_batch([text]) == [tok.encode(text)] and tok.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_prepare_data_with_the_smollm2_gguf_tokenizer(tmp_path, smollm2_gguf):
    from unmask.data.prepare import PrepareOptions, prepare_data
    from unmask.data.shards import read_manifest
    from unmask.data.special import SpecialTokens

    path = smollm2_gguf
    (tmp_path / "a.txt").write_text("Masked diffusion fills in blanks.\n\nTwo  spaces, ünïcödé 漢字 🙂\n" * 20)
    (tmp_path / "b.txt").write_text("Another document, with other words in it.\n" * 20)
    out = tmp_path / "data"
    prepare_data(PrepareOptions(inputs=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], out=out, seq_len=32,
                                tokenizer=path, val_fraction=0.0, workers=1, progress=False))
    manifest = read_manifest(out / "train")
    # the ids the import of the same GGUF uses (test_smollm2_gguf_logits_equal_transformers)
    assert manifest.special == SpecialTokens(pad=2, unk=0, bos=1, eos=2, mask=49152)
    assert manifest.vocab_size == 49153


@pytest.mark.slow
def test_smollm2_gguf_logits_equal_transformers(capsys, smollm2_gguf):
    """SmolLM2-135M through transformers' GGUF loader: unmask's causal logits equal transformers' own model's."""
    from unmask.model.hf.causal import load_tokenizer

    path = smollm2_gguf
    fields, state, special = read_folder(path)
    assert fields["n_kv_heads"] == 3 and fields["tie_embeddings"] and fields["rope_theta"] == 100000.0
    assert special.mask == 49152 and fields["vocab_size"] == 49153
    assert (special.pad, special.unk, special.bos, special.eos) == (2, 0, 1, 2)
    tok = load_tokenizer(path)
    tokens = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. Masked diffusion models "
                                      "learn to fill in the blanks of a sentence.")])
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(tokens).logits
    got = unmask_logits(fields, state, tokens)[..., :49152]
    diff = (got - want).abs().max().item()
    with capsys.disabled():
        print(f"\nSmolLM2-135M GGUF, {tokens.shape[1]} tokens: max |logit diff| = {diff:.3g} "
              f"(logit scale {want.abs().max().item():.3g})")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
