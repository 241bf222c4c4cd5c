"""Tokenizer: lossless settings, unmask's special ids, and the Hugging Face export."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm

from unmask.data.special import SpecialTokens
from unmask.data.tokenizer import Tokenizer, export_hf_tokenizer, sample_lines, train_tokenizer
from unmask.errors import DataError

TRICKY = [
    "  two leading spaces, trailing  \n",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines",
    "ünïcödé, 漢字, emoji 🙂 and a rare ǂ character",
    "a literal <mask> in the text",
    "x",
]


def test_special_ids_are_unmasks(tiny_shards):
    tok = Tokenizer(tiny_shards / "tokenizer.model")
    assert tok.special == SpecialTokens()
    assert [tok.sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "<bos>", "<eos>", "<mask>"]
    assert tok.vocab_size == 512


def test_lossless_on_corpus_and_tricky_text(tiny_shards, tiny_corpus):
    tok = Tokenizer(tiny_shards / "tokenizer.model")
    for text in [p.read_text(encoding="utf-8") for p in tiny_corpus] + TRICKY:
        ids = tok.encode(text)
        assert tok.special.unk not in ids  # byte fallback: nothing is unknown
        assert tok.decode(ids) == text


def test_tokenizer_with_other_special_ids_is_refused(tmp_path):
    model = io.BytesIO()  # sentencepiece defaults: unk=0, bos=1, eos=2, no pad, no <mask>
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["some text here"] * 50 + TRICKY), model_writer=model,
                                   vocab_size=40, minloglevel=2)
    path = tmp_path / "other.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(DataError, match=r"other\.model: special token <pad> has id"):
        Tokenizer(path)


def test_unigram_is_lossless_and_vocab_too_small_is_refused(tmp_path, tiny_corpus):
    lines = sample_lines((p.read_text() for p in tiny_corpus[:3]), 5000, seed=0)
    tok = train_tokenizer(lines, tmp_path / "u.model", vocab_size=400, model_type="unigram")
    assert tok.sp.id_to_piece(4) == "<mask>"
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(DataError, match="--vocab-size 100 is too small"):
        train_tokenizer(lines, tmp_path / "small.model", vocab_size=100)


def test_sample_lines_is_seeded_and_bounded():
    docs = [f"line {i}\n\nother {i}" for i in range(1000)]
    a, b, c = sample_lines(docs, 50, 1), sample_lines(docs, 50, 1), sample_lines(docs, 50, 2)
    assert a == b and a != c and len(a) == 50 and all(line.strip() for line in a)


def test_hf_tokenizer_gives_identical_ids(tiny_shards, tiny_corpus, tmp_path):
    from transformers import AutoTokenizer

    export_hf_tokenizer(tiny_shards / "tokenizer.model", tmp_path)  # prepare-data wrote one too; same function
    assert (tmp_path / "tokenizer.json").read_bytes() == (tiny_shards / "tokenizer.json").read_bytes()
    tok = Tokenizer(tiny_shards / "tokenizer.model")
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    special = SpecialTokens()
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.mask_token_id) == (
        special.pad, special.unk, special.bos, special.eos, special.mask)
    for text in [p.read_text(encoding="utf-8") for p in tiny_corpus] + TRICKY:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text)
        assert hf.decode(ids) == text
