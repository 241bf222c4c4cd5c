"""prepare-data: lossless round trip through the shards, manifests, split, inputs, atomicity and re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unmask.cli import main
from unmask.data import shards as shards_mod
from unmask.data.documents import digest_fraction, document_digest, expand_inputs, iter_documents
from unmask.data.fsutil import sha256_file
from unmask.data.loader import ShardLoader, read_manifest
from unmask.data.prepare import PrepareOptions, prepare_data
from unmask.data.special import SpecialTokens
from unmask.data.tokenizer import Tokenizer
from unmask.errors import DataError


def split_tokens(out: Path, split: str) -> np.ndarray:
    """All samples of a split in write order, through the real loader."""
    m = read_manifest(out / split)
    loader = ShardLoader(out / split, 64, seq_len=m.seq_len, model_vocab_size=m.vocab_size, loop=False, shuffle=False)
    return np.concatenate([b.numpy() for b in loader])


def detokenize(out: Path, split: str) -> list[str]:
    tok = Tokenizer(out / "tokenizer.model")
    rows = split_tokens(out, split)
    assert (rows[:, 0] == tok.special.bos).all(), "every sample opens with <bos>"
    flat = rows[:, 1:].ravel()
    flat = flat[flat != tok.special.pad]
    ends = np.flatnonzero(flat == tok.special.eos)
    assert len(ends) and ends[-1] == len(flat) - 1, "every document ends with <eos>"
    return [tok.decode(piece) for piece in np.split(flat, ends + 1)[:-1]]


def test_round_trip_is_lossless(tiny_shards, tiny_corpus):
    docs = list(iter_documents(tiny_corpus))
    train, val = detokenize(tiny_shards, "train"), detokenize(tiny_shards, "val")
    assert len(val) >= 1 and len(train) >= 1
    assert sorted(train + val) == sorted(docs)
    # each split keeps input order
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]


def test_manifest_describes_the_shards(tiny_shards):
    tok_sha = sha256_file(tiny_shards / "tokenizer.model")
    for split in ("train", "val"):
        raw = json.loads((tiny_shards / split / "manifest.json").read_text())
        m = read_manifest(tiny_shards / split)
        assert raw["special_tokens"] == SpecialTokens().to_dict()
        assert (m.seq_len, m.vocab_size, m.dtype, m.tokenizer_sha256) == (128, 512, "uint16", tok_sha)
        assert m.num_samples == sum(s.samples for s in m.shards)
        assert m.num_tokens == sum(s.tokens for s in m.shards)
        assert sorted(p.name for p in (tiny_shards / split).iterdir()) == sorted(
            [s.name for s in m.shards] + ["manifest.json"])
        for s in m.shards:
            assert sha256_file(tiny_shards / split / s.name) == s.sha256
            assert (tiny_shards / split / s.name).stat().st_size == s.bytes <= 50_000
        tokens = split_tokens(tiny_shards, split)
        assert tokens.shape == (m.num_samples, 128)
        assert int((tokens != 0).sum()) == m.num_tokens
    assert len(read_manifest(tiny_shards / "train").shards) > 8  # the loader tests need several groups


def test_split_is_by_document_hash(tiny_shards, tiny_corpus):
    val = set(detokenize(tiny_shards, "val"))
    by_hash = {d for d in iter_documents(tiny_corpus) if digest_fraction(document_digest(d)) < 0.45}
    if by_hash:
        assert val == by_hash
    else:  # no document under the fraction: the smallest hash is held out
        assert val == {min(iter_documents(tiny_corpus), key=document_digest)}


def test_no_cross_document_pads_instead(tiny_shards, tiny_corpus, tmp_path):
    out = tmp_path / "out"
    prepare_data(PrepareOptions(inputs=[str(p) for p in tiny_corpus[1:4]], out=out, seq_len=64,
                                tokenizer=tiny_shards / "tokenizer.model", cross_document=False, val_fraction=0,
                                workers=1, progress=False))
    special = SpecialTokens()
    for row in split_tokens(out, "train"):
        eos = np.flatnonzero(row == special.eos)
        assert len(eos) <= 1
        if len(eos):
            assert (row[eos[0] + 1 :] == special.pad).all()  # nothing of a second document
    assert detokenize(out, "train") == list(iter_documents(tiny_corpus[1:4]))
    assert read_manifest(out / "val").num_samples == 0


def test_jsonl_inputs_dirs_and_globs(tmp_path, tiny_shards):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    rows = [{"body": f"document number {i}\nwith two lines", "id": i} for i in range(30)]
    (corpus / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (corpus / "sub" / "b.txt").write_text("a plain text file\n")
    (corpus / "sub" / "image.png").write_bytes(b"\x89PNG\x00\xff")  # not read from a directory
    assert expand_inputs([str(corpus)]) == [corpus / "a.jsonl", corpus / "sub" / "b.txt"]
    assert expand_inputs([str(corpus / "**" / "*.txt")]) == [corpus / "sub" / "b.txt"]
    out = tmp_path / "out"
    prepare_data(PrepareOptions(inputs=[str(corpus)], out=out, seq_len=16, jsonl_field="body",
                                tokenizer=tiny_shards / "tokenizer.model", val_fraction=0.2, workers=2, progress=False))
    got = detokenize(out, "train") + detokenize(out, "val")
    assert sorted(got) == sorted([r["body"] for r in rows] + ["a plain text file\n"])


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: no string field 'text' \(found \['body'\]\)"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        list(iter_documents([tmp_path / "bad.jsonl"]))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["prepare-data", str(tmp_path / "missing*.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing*.txt" in err and "matches no file" in err


def test_rerun_is_idempotent_and_other_settings_are_refused(tiny_shards, tiny_corpus, tmp_path, capsys):
    opts = PrepareOptions(inputs=[str(p) for p in tiny_corpus[:2]], out=tmp_path / "o", seq_len=32,
                          tokenizer=tiny_shards / "tokenizer.model", workers=1, progress=False)
    assert main(["prepare-data", *opts.inputs, "--out", str(opts.out), "--seq-len", "32", "--tokenizer",
                 str(opts.tokenizer), "--workers", "1", "--no-progress"]) == 0
    assert prepare_data(opts).already_complete
    opts.seq_len = 64
    with pytest.raises(DataError, match=r"prepared with other settings \(seq_len: 32 then, 64 now\)"):
        prepare_data(opts)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    opts.out = foreign
    with pytest.raises(DataError, match="not empty and was not written by prepare-data"):
        prepare_data(opts)


def test_interrupted_run_leaves_nothing_whole_and_rerun_finishes(tiny_corpus, tmp_path, monkeypatch):
    inputs = [str(p) for p in tiny_corpus[:4]]

    def opts(out):
        return PrepareOptions(inputs=inputs, out=out, vocab_size=400, seq_len=64, val_fraction=0.3,
                              shard_size_mb=0.02, workers=2, progress=False)

    reference = prepare_data(opts(tmp_path / "reference"))
    real_write, calls = shards_mod.SplitWriter.write, []

    def crash_midway(self, sample):
        calls.append(1)
        if len(calls) == 300:
            raise KeyboardInterrupt  # like Ctrl-C, in the middle of a shard
        real_write(self, sample)

    monkeypatch.setattr(shards_mod.SplitWriter, "write", crash_midway)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_data(opts(out))
    monkeypatch.undo()
    leftovers = sorted(p.name for p in (out / "train").iterdir())
    assert "manifest.json" not in leftovers and any(n.endswith(".tar.partial") for n in leftovers)
    with pytest.raises(DataError, match="not a complete split"):
        ShardLoader(out / "train", 4, seq_len=64, model_vocab_size=400)
    result = prepare_data(opts(out))  # finishes what the first run started
    assert not result.already_complete
    for split in ("train", "val"):
        assert read_manifest(out / split) == read_manifest(tmp_path / "reference" / split)
        assert not list((out / split).glob("*.partial"))
    assert result.train.tokenizer_sha256 == reference.train.tokenizer_sha256  # deterministic training


def test_failed_run_can_be_retried_with_other_settings(tiny_corpus, tmp_path):
    opts = PrepareOptions(inputs=[str(tiny_corpus[1])], out=tmp_path / "o", vocab_size=30000, val_fraction=0,
                          workers=1, progress=False)
    with pytest.raises(DataError, match="could not train a 30000-piece bpe vocabulary .* change --vocab-size"):
        prepare_data(opts)
    opts.vocab_size = 400
    assert prepare_data(opts).train.vocab_size == 400
