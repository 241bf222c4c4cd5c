"""`unmask prepare-data`: corpus -> sentencepiece tokenizer -> packed webdataset shards.

Stages:
1. scan: read every document once to hash it (train/val split), count its bytes (progress total) and,
   when a tokenizer is to be trained, sample training lines from the train documents;
2. tokenizer: train one (or copy `--tokenizer`) to OUT/tokenizer.model and export OUT/tokenizer.json; or, for
   `--tokenizer` an imported model's Hugging Face tokenizer (folder, tokenizer.json, .gguf), write it with `<mask>`
   added as OUT/tokenizer.json alone (hf_tokenizer.py);
3. tokenize in a process pool (ordered, with bounded read-ahead), pack and write OUT/train and OUT/val.

`format="chat"` reads JSON Lines of conversations instead (chat.py) and writes SFT shards, one conversation per
sample with its prompt mask (sft.py); a document is then a conversation as its chat template renders it.

Re-running: OUT/.prepare-data.json records the settings (inputs with sizes and mtimes, every option
that changes the output). Same settings and both manifests present: nothing to do. Same settings but
incomplete (interrupted): leftovers are removed and the shards rewritten; a tokenizer that had been
completely written is kept. Same settings written by an older shard format: the shards are rewritten
with the tokenizer kept. Other settings over an incomplete run: it is replaced. Other settings over
a complete run, or a non-empty OUT that prepare-data did not create: refused with a DataError. Output
is deterministic, so a finished re-run equals an uninterrupted run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from unmask.data import documents as docs_mod
from unmask.data.chat import DEFAULT_TEMPLATE, ChatTemplate, tokenizer_template
from unmask.data.fsutil import PARTIAL, atomic_write_text
from unmask.data.hf_tokenizer import (
    HFTokenizer,
    adopt_hf_tokenizer,
    is_hf_source,
    source_chat_template,
    source_sha256,
)
from unmask.data.sft import OVERFLOW, conversation_texts, write_sft_splits
from unmask.data.shards import FORMAT, MANIFEST, Manifest, Packer, SplitWriter, read_manifest, token_dtype
from unmask.data.tokenizer import Tokenizer, export_hf_tokenizer, sample_lines, train_tokenizer
from unmask.errors import DataError

STATE = ".prepare-data.json"
SPLITS = ("train", "val")
CHAT_TEMPLATES = ("auto", "default", "tokenizer")
CHUNK_CHARS = 1 << 18  # text per pool task: amortises pickling, keeps every worker busy to the end


@dataclass
class PrepareOptions:
    inputs: list[str]
    out: Path
    vocab_size: int = 8192
    seq_len: int = 256
    tokenizer_type: str = "bpe"
    tokenizer: Path | None = None  # reuse this sentencepiece model, or an imported model's HF tokenizer (hf_tokenizer)
    jsonl_field: str = "text"
    format: str = "text"  # "chat": JSON Lines of conversations -> SFT shards (sft.py)
    sft_overflow: str = "refuse"  # chat: a conversation longer than seq_len is refused, or its response cut
    chat_template: str = "auto"  # chat: the tokenizer's own template when it has one (auto, tokenizer), or unmask's
    val_fraction: float = 0.01
    shard_size_mb: float = 32.0
    cross_document: bool = True
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    max_sentences: int = 1_000_000  # lines sampled to train the tokenizer
    progress: bool = True


@dataclass
class PrepareResult:
    out: Path
    train: Manifest
    val: Manifest
    already_complete: bool = False
    text_bytes: int = 0
    tokenize_seconds: float = 0.0
    tokenizer_seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.tokenize_seconds, 1e-9)


def prepare_data(opts: PrepareOptions) -> PrepareResult:
    _validate(opts)
    out = Path(opts.out)
    files = docs_mod.expand_inputs(opts.inputs)
    template = _chat_template(opts) if opts.format == "chat" else None
    if template is not None:
        print(f"chat template: {template.name} " + ("(the tokenizer's own; --chat-template default for unmask's)"
                                                    if template.jinja else "(unmask's default)"))
    if _claim(out, _settings(opts, files, template)):
        return PrepareResult(out, read_manifest(out / "train"), read_manifest(out / "val"), already_complete=True)

    # 1. scan
    hf_tok = opts.tokenizer is not None and is_hf_source(opts.tokenizer)
    train_tok = opts.tokenizer is None and not (out / "tokenizer.model").is_file()
    scan = _Scan(opts.val_fraction)
    train_docs = scan.run(_documents(opts, files, template))
    lines = sample_lines(train_docs, opts.max_sentences, opts.seed) if train_tok else None
    for _ in train_docs:  # drain when no tokenizer is trained
        pass
    scan.finish(files)

    # 2. tokenizer
    t0 = time.perf_counter()
    model_path = out / "tokenizer.model"
    if hf_tok:  # the imported model's own tokenizer, <mask> added (no tokenizer.model)
        if not (out / "tokenizer.json").is_file():
            adopt_hf_tokenizer(opts.tokenizer, out)
        model_path = out / "tokenizer.json"
        tok = HFTokenizer(model_path)
    elif train_tok:
        tok = train_tokenizer(lines, model_path, vocab_size=opts.vocab_size, model_type=opts.tokenizer_type,
                              seed=opts.seed, num_threads=opts.workers)
    else:
        if opts.tokenizer is not None and not model_path.is_file():
            Tokenizer(opts.tokenizer)  # check before copying
            shutil.copyfile(opts.tokenizer, model_path.with_name(model_path.name + PARTIAL))
            os.replace(model_path.with_name(model_path.name + PARTIAL), model_path)
        tok = Tokenizer(model_path)
    probe = "Two  spaces,\ttab\r\nünïcödé 漢字 🙂\n"
    if not tok.is_lossless_on(probe):
        print(f"warning: tokenizer {model_path} is not lossless (it normalises text); detokenized "
              "documents will differ from the input")
    if not hf_tok:
        export_hf_tokenizer(model_path, out)
    tokenizer_seconds = time.perf_counter() - t0

    # 3. tokenize, pack, write
    t0 = time.perf_counter()
    if opts.format == "chat":
        manifests = write_sft_splits(out, files, tok, scan.is_val, seq_len=opts.seq_len, overflow=opts.sft_overflow,
                                     shard_bytes=int(opts.shard_size_mb * 1e6), total_bytes=scan.total_bytes,
                                     progress=opts.progress, template=template)
    else:
        manifests = _write_splits(opts, files, tok, scan)
    return PrepareResult(out, manifests["train"], manifests["val"], text_bytes=scan.total_bytes,
                         tokenize_seconds=time.perf_counter() - t0, tokenizer_seconds=tokenizer_seconds)


def _validate(opts: PrepareOptions) -> None:
    checks = [
        (opts.seq_len >= 2, f"--seq-len {opts.seq_len} must be at least 2"),
        (0 <= opts.val_fraction < 1, f"--val-fraction {opts.val_fraction} must be in [0, 1)"),
        (opts.shard_size_mb > 0, f"--shard-size-mb {opts.shard_size_mb} must be positive"),
        (opts.workers >= 1, f"--workers {opts.workers} must be at least 1"),
        (opts.max_sentences >= 1, f"--max-sentences {opts.max_sentences} must be at least 1"),
        (opts.tokenizer_type in ("bpe", "unigram"), f"--tokenizer-type {opts.tokenizer_type!r}: use bpe or unigram"),
        (opts.tokenizer is None or Path(opts.tokenizer).exists(), f"--tokenizer {opts.tokenizer} does not exist"),
        (opts.format in ("text", "chat"), f"--format {opts.format!r}: use text or chat"),
        (opts.sft_overflow in OVERFLOW, f"--sft-overflow {opts.sft_overflow!r}: use {' or '.join(OVERFLOW)}"),
        (opts.chat_template in CHAT_TEMPLATES, f"--chat-template {opts.chat_template!r}: use "
                                               f"{', '.join(CHAT_TEMPLATES)}"),
        (opts.format == "chat" or opts.chat_template == "auto", "--chat-template applies to --format chat only"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DataError(msg)


def _chat_template(opts: PrepareOptions) -> ChatTemplate:
    """--chat-template: `default` unmask's; `tokenizer` the imported tokenizer's own (an error when it has none);
    `auto` the tokenizer's when it has one, else unmask's."""
    if opts.chat_template == "default":
        return DEFAULT_TEMPLATE
    hf = opts.tokenizer is not None and is_hf_source(opts.tokenizer)
    jinja, tokens = source_chat_template(opts.tokenizer) if hf else (None, {})
    if jinja:
        return tokenizer_template(jinja, tokens, opts.tokenizer)
    if opts.chat_template == "tokenizer":
        what = f"the tokenizer {opts.tokenizer} has no chat_template" if hf else (
            "it needs --tokenizer, an imported model's Hugging Face tokenizer (folder or .gguf) with a chat_template")
        raise DataError(f"--chat-template tokenizer: {what}; pass --chat-template default for unmask's template")
    return DEFAULT_TEMPLATE


def _settings(opts: PrepareOptions, files: list[Path], template: ChatTemplate | None = None) -> dict:
    """Everything that determines the output; `workers` and `progress` do not."""
    inputs = []
    for f in files:
        st = f.stat()
        inputs.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    tok = source_sha256(opts.tokenizer) if opts.tokenizer else None
    settings = dict(
        inputs=inputs, vocab_size=None if tok else opts.vocab_size, seq_len=opts.seq_len,
        tokenizer_type=None if tok else opts.tokenizer_type, tokenizer_sha256=tok, jsonl_field=opts.jsonl_field,
        val_fraction=opts.val_fraction, shard_size_mb=opts.shard_size_mb, cross_document=opts.cross_document,
        seed=opts.seed, max_sentences=None if tok else opts.max_sentences, format=FORMAT,
    )
    if opts.format == "chat":  # chat-only keys, so a text run's recorded settings are what they always were
        settings.update(input_format="chat", sft_overflow=opts.sft_overflow,
                        chat_template=(template or DEFAULT_TEMPLATE).to_dict())
    return settings


def _documents(opts: PrepareOptions, files: list[Path], template: ChatTemplate | None) -> Iterator[str]:
    if opts.format == "chat":
        return conversation_texts(files, template or DEFAULT_TEMPLATE)
    return docs_mod.iter_documents(files, opts.jsonl_field)


def _claim(out: Path, settings: dict) -> bool:
    """Make `out` ours for these settings. True when it already holds the complete result."""
    state = out / STATE
    if state.is_file():
        old = json.loads(state.read_text())
        complete = all((out / s / MANIFEST).is_file() for s in SPLITS) and (out / "tokenizer.json").is_file()
        if old != settings and {**old, "format": FORMAT} == settings:
            # an older unmask's shards (say, rows without the leading <bos>): the tokenizer stays valid
            print(f"{out}: shards written by an older unmask ({old.get('format', 'unmask-shards/1')}); "
                  f"rewriting them as {FORMAT} with the same tokenizer")
            _remove_leftovers(out)
            atomic_write_text(state, json.dumps(settings, indent=1))
            return False
        if old != settings:
            key = next((k for k in settings if old.get(k) != settings[k]), "format")
            what = "the input files changed" if key == "inputs" else (
                f"{key}: {old.get(key)!r} then, {settings[key]!r} now")
            if complete:
                raise DataError(f"{out} was prepared with other settings ({what}); pass another --out or delete {out}")
            # nothing whole would be lost: an unfinished run (say, a failed tokenizer training) is replaced
            print(f"{out}: replacing an unfinished run made with other settings ({what})")
            _remove_leftovers(out, tokenizer=True)
            atomic_write_text(state, json.dumps(settings, indent=1))
            return False
        if complete:
            for s in SPLITS:
                for shard in read_manifest(out / s).shards:
                    p = out / s / shard.name
                    if not p.is_file() or p.stat().st_size != shard.bytes:
                        raise DataError(f"{p} is missing or damaged although {out} is complete; "
                                        f"delete {out} and re-run")
            print(f"{out}: already complete with these settings; nothing to do")
            return True
        _remove_leftovers(out)
        print(f"{out}: an earlier run was interrupted; rewriting its shards")
        return False
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a directory")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out} is not empty and was not written by prepare-data; pass a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state, json.dumps(settings, indent=1))
    return False


def _remove_leftovers(out: Path, tokenizer: bool = False) -> None:
    for s in SPLITS:
        d = out / s
        if d.is_dir():
            for p in list(d.glob("shard-*.tar*")) + [d / MANIFEST]:
                p.unlink(missing_ok=True)
    for p in out.glob(f"*{PARTIAL}"):
        p.unlink()
    for p in out.glob(".hf-export-*"):
        shutil.rmtree(p, ignore_errors=True)
    if tokenizer:
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            (out / name).unlink(missing_ok=True)


class _Scan:
    """First pass: split assignment by hash, byte total; yields the train documents."""

    def __init__(self, val_fraction: float):
        self.val_fraction = val_fraction
        self.total_bytes = self.num_docs = self.num_val = 0
        self.min_digest: bytes | None = None
        self.fallback: bytes | None = None

    def run(self, documents: Iterator[str]) -> Iterator[str]:
        for text in documents:
            digest = docs_mod.document_digest(text)
            self.total_bytes += len(text.encode("utf-8", "surrogatepass"))
            self.num_docs += 1
            if self.min_digest is None or digest < self.min_digest:
                self.min_digest = digest
            if docs_mod.digest_fraction(digest) < self.val_fraction:
                self.num_val += 1
            else:
                yield text

    def finish(self, files: list[Path]) -> None:
        if self.num_docs == 0:
            raise DataError(f"the {len(files)} input file(s) hold no non-empty document")
        # A small corpus may have no document under the val fraction; the smallest hash then goes to
        # val (still a function of the documents only). Its lines may have been sampled for the tokenizer.
        if self.val_fraction > 0 and self.num_val == 0 and self.num_docs >= 2:
            self.fallback, self.num_val = self.min_digest, 1
        if self.num_val == self.num_docs:
            raise DataError(f"all {self.num_docs} documents fall in the validation split; lower --val-fraction")

    def is_val(self, digest: bytes) -> bool:
        return digest == self.fallback or docs_mod.digest_fraction(digest) < self.val_fraction


def _write_splits(opts: PrepareOptions, files: list[Path], tok: Tokenizer | HFTokenizer,
                  scan: _Scan) -> dict[str, Manifest]:
    out = Path(opts.out)
    writers = {s: SplitWriter(out / s, split=s, seq_len=opts.seq_len, vocab_size=tok.vocab_size,
                              special=tok.special, tokenizer_sha256=tok.sha256, cross_document=opts.cross_document,
                              shard_bytes=int(opts.shard_size_mb * 1e6)) for s in SPLITS}
    packers = {s: Packer(opts.seq_len, tok.special, opts.cross_document) for s in SPLITS}
    bar = tqdm(total=scan.total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not opts.progress,
               dynamic_ncols=True)
    docs = tokens = 0
    dtype = token_dtype(tok.vocab_size)
    texts = docs_mod.iter_documents(files, opts.jsonl_field)
    for chunk in _tokenize(texts, opts.workers, str(tok.path), dtype):
        for digest, n_bytes, ids in chunk:
            split = "val" if scan.is_val(digest) else "train"
            for sample in packers[split].add(ids):
                writers[split].write(sample)
            writers[split].num_documents += 1
            docs += 1
            tokens += len(ids)
            bar.update(n_bytes)
        bar.set_postfix_str(f"{docs} docs, {tokens / 1e6:.2f}M tokens", refresh=False)
    bar.close()
    manifests = {}
    for s in SPLITS:
        for sample in packers[s].finish():
            writers[s].write(sample)
        manifests[s] = writers[s].close()
    return manifests


_ENCODE = None  # one batch encoder per pool worker process


def _init_worker(model_path: str) -> None:
    global _ENCODE
    if model_path.endswith(".json"):  # an imported model's tokenizer (hf_tokenizer)
        _ENCODE = HFTokenizer(model_path).encode_batch
    else:
        _ENCODE = spm.SentencePieceProcessor(model_file=model_path).encode


def _encode_chunk(texts: list[str], dtype: np.dtype) -> list[tuple[bytes, int, np.ndarray]]:
    ids = _ENCODE(texts)
    out = []
    for text, doc_ids in zip(texts, ids, strict=True):
        raw = text.encode("utf-8", "surrogatepass")
        out.append((docs_mod.document_digest(text), len(raw), np.asarray(doc_ids, dtype=dtype)))
    return out


def _chunks(texts: Iterator[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _tokenize(texts: Iterator[str], workers: int, model_path: str, dtype: np.dtype) -> Iterator[list]:
    """Encoded chunks in input order. Pool.imap would read the whole corpus ahead into memory, so
    tasks are submitted by hand with at most 2 per worker in flight."""
    if workers == 1:
        _init_worker(model_path)
        for chunk in _chunks(texts):
            yield _encode_chunk(chunk, dtype)
        return
    with multiprocessing.Pool(workers, _init_worker, (model_path,)) as pool:
        pending: deque = deque()
        for chunk in _chunks(texts):
            pending.append(pool.apply_async(_encode_chunk, (chunk, dtype)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
