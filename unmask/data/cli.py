"""`unmask prepare-data INPUTS... --out DIR`: tokenize a corpus into packed webdataset shards.

Writes OUT/tokenizer.model, OUT/tokenizer.json (Hugging Face), OUT/train/ and OUT/val/ (tar shards +
manifest.json). Point the training config's data.train_dir / data.val_dir at OUT/train and OUT/val.
With --format chat the shards are SFT shards (unmask/data/sft.py): one conversation per sample, with its prompt mask.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from unmask.data.prepare import PrepareOptions, prepare_data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PrepareOptions(inputs=[], out=Path("."))
    a = parser.add_argument
    a("inputs", nargs="+", metavar="INPUT",
      help="text files, directories (their .txt/.md/.rst/.jsonl/.json files) or quoted globs; "
           ".jsonl/.json files are JSON Lines")
    a("--out", required=True, type=Path, help="output directory (new or empty, or an earlier run's to finish it)")
    a("--vocab-size", type=int, default=d.vocab_size, help="tokenizer vocabulary size (default %(default)s)")
    a("--seq-len", type=int, default=d.seq_len, help="tokens per packed sample (default %(default)s)")
    a("--tokenizer-type", choices=("bpe", "unigram"), default=d.tokenizer_type,
      help="sentencepiece model type (default %(default)s; bpe trains ~10x faster)")
    a("--tokenizer", type=Path, default=None, help="reuse this sentencepiece .model instead of training one, or use an "
                                                     "imported model's own tokenizer (HF folder, tokenizer.json or "
                                                     ".gguf; <mask> is added)")
    a("--jsonl-field", default=d.jsonl_field, help="JSON Lines field holding the text (default %(default)s)")
    a("--format", choices=("text", "chat"), default=d.format,
      help="text: documents for pretraining (default); chat: JSON Lines of conversations ({\"prompt\", "
           "\"response\"} or {\"messages\": [{\"role\", \"content\"}, ...]}) -> SFT shards, one conversation "
           "per sample with its prompt mask, rendered with a chat template (--chat-template)")
    a("--sft-overflow", choices=("refuse", "truncate"), default=d.sft_overflow,
      help="--format chat: a conversation longer than --seq-len stops the run naming its line (refuse, the "
           "default) or has its response cut to fit (truncate); the prompt is never cut")
    a("--chat-template", choices=("auto", "default", "tokenizer"), default=d.chat_template,
      help="--format chat: the template conversations are rendered with: tokenizer, the --tokenizer's own Jinja "
           "chat_template (an imported model's); default, unmask's; auto (the default): the tokenizer's when it "
           "has one, else unmask's")
    a("--val-fraction", type=float, default=d.val_fraction,
      help="fraction of documents (by content hash) held out for validation (default %(default)s)")
    a("--shard-size-mb", type=float, default=d.shard_size_mb, help="target tar shard size (default %(default)s)")
    a("--no-cross-document", dest="cross_document", action="store_false",
      help="never pack two documents into one sample; pad each document's last sample instead")
    a("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)")
    a("--seed", type=int, default=d.seed, help="seed for sampling tokenizer training lines")
    a("--max-sentences", type=int, default=d.max_sentences,
      help="lines sampled from the train documents to train the tokenizer (default %(default)s)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    fields = PrepareOptions.__dataclass_fields__
    result = prepare_data(PrepareOptions(**{k: v for k, v in vars(args).items() if k in fields}))
    if not result.already_complete:
        print(f"tokenized {result.text_bytes / 1e6:.1f} MB of text in {result.tokenize_seconds:.1f} s "
              f"({result.mb_per_s:.1f} MB/s); tokenizer {result.tokenizer_seconds:.1f} s")
    for m in (result.train, result.val):
        print(f"{m.split}: {m.num_documents} documents, {m.num_samples} samples x {m.seq_len} tokens "
              f"({m.num_tokens} non-padding) in {len(m.shards)} shard(s) -> {m.path}")
    files = [p for p in (result.out / "tokenizer.model", result.out / "tokenizer.json") if p.is_file()]
    print(f"tokenizer: {', '.join(map(str, files))} ({result.train.vocab_size} pieces)")
    return 0
