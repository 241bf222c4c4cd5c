"""A loader's sources: each a split (directory or URL) with a weight, checked against the model and each other.

All sources must share the tokenizer: each manifest's tokenizer sha256 is compared with the tokenizer file (next
to the first source, or `tokenizer_path`), and the first one that differs stops the run naming it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from unmask.data.reader import is_url, join, parent, read_bytes
from unmask.data.shards import MANIFEST, Manifest, read_manifest
from unmask.errors import DataError


@dataclass(frozen=True)
class Source:
    location: str
    weight: float
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.location.rstrip("/")

    @property
    def label(self) -> str:
        """A metric-name-safe label: the split's folder name, `<parent>_<split>` for train/val folders."""
        parts = [p for p in re.split(r"[/\\]", self.name) if p]
        pick = "_".join(parts[-2:]) if len(parts) > 1 and parts[-1] in ("train", "val") else parts[-1]
        return re.sub(r"[^A-Za-z0-9_]", "_", pick)


def load_sources(spec: list[tuple[str, float]], *, seq_len: int, model_vocab_size: int,
                 tokenizer_path: str | Path | None, retries: int) -> list[Source]:
    if not spec or any(w <= 0 for _, w in spec):
        raise DataError(f"data sources {spec}: give at least one, each with a weight > 0")
    sources = [Source(str(loc), float(w), read_manifest(loc, retries)) for loc, w in spec]
    kinds = {src.manifest.sft is not None for src in sources}
    if len(kinds) > 1:
        sft = [s.location for s in sources if s.manifest.sft is not None]
        raise DataError(f"data sources mix SFT splits ({', '.join(sft)}) with pretraining ones; their batches differ "
                        "(SFT ones carry a prompt mask): mix only splits of one kind")
    tok = str(tokenizer_path) if tokenizer_path else join(parent(sources[0].location), "tokenizer.model")
    if not tokenizer_path and not is_url(tok) and not Path(tok).is_file():  # an imported model's tokenizer alone
        tok = join(parent(sources[0].location), "tokenizer.json")
    if not is_url(tok) and not Path(tok).is_file():
        raise DataError(f"{tok} does not exist; the shards in {sources[0].location} need the tokenizer "
                        "prepare-data wrote")
    tok_sha = hashlib.sha256(read_bytes(tok, retries)).hexdigest()
    for src in sources:
        m, where = src.manifest, join(src.location, MANIFEST)
        if m.seq_len != seq_len:
            raise DataError(f"{where}: shards have seq_len={m.seq_len} but {seq_len} was asked for; set "
                            f"train.seq_len={m.seq_len} or re-run prepare-data with --seq-len {seq_len}")
        if m.vocab_size > model_vocab_size:
            raise DataError(f"{where}: the tokenizer has {m.vocab_size} pieces but "
                            f"model.vocab_size={model_vocab_size}; set model.vocab_size >= {m.vocab_size}")
        if m.tokenizer_sha256 != tok_sha:
            what = "is not the tokenizer the shards in" if len(sources) == 1 else "differs from the tokenizer of"
            raise DataError(f"{tok} {what} {src.location} were made with (sha256 differs from {where}); every "
                            "source must be prepared with the same tokenizer (prepare-data --tokenizer "
                            f"{tok}), or point at the matching tokenizer")
        if m.num_samples == 0:
            raise DataError(f"{where}: the split has no samples; re-run prepare-data with more text "
                            "(or --val-fraction > 0 for val), or leave this split out of the config")
    return sources
