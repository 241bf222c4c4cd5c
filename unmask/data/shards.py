"""Packing token streams into fixed-length samples and writing them as webdataset tar shards.

Format of a split directory (`OUT/train`, `OUT/val`):
- `shard-000000.tar`, ...: webdataset tars; sample `k` (numbered across the split, in write order) is
  the member `{k:010d}.tokens.npy`, a 1-D array of `seq_len` token ids in the manifest's dtype. An SFT split
  (manifest `sft` set, see sft.py) also has `{k:010d}.prompt_mask.npy`: `seq_len` uint8, 1 on prompt tokens.
- `manifest.json`: written last. Its presence is what makes the split whole; shards are first written
  as `*.tar.partial` and renamed when complete, so an interrupted run leaves nothing a reader accepts.

Packing (MDLM-style wrapping): documents are concatenated, each followed by `<eos>`, and every sample is
`<bos>` followed by the next `seq_len - 1` tokens of that stream, so a sample may hold the end of one
document and the start of the next. Position 0 is always `<bos>`: that is where every sampler template,
the evaluations and the AR judge put it, so conditioning on it is trained (manifest `row_prefix: "bos"`).
With `cross_document=False` a sample never holds two documents: each document (+ `<eos>`) is cut on
its own and its last piece is padded with `<pad>`. In both modes the split's final sample is padded,
so no token is dropped: concatenating the samples without their `<bos>`, removing `<pad>` and splitting
at `<eos>` gives back every document's token ids.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from unmask.data.fsutil import HashingWriter, atomic_write_text, commit, partial_path
from unmask.data.special import SpecialTokens
from unmask.errors import DataError

FORMAT = "unmask-shards/2"  # /1: rows were cut from the stream without a leading <bos>
ROW_PREFIX = "bos"
MANIFEST = "manifest.json"
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to whole records


def tar_size(entries_bytes: int) -> int:
    """Size of a tar holding entries of this total size: + 2 end-of-archive blocks, padded to a record."""
    return -(-(entries_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:010d}"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id (int32 past 2**16: torch reads it directly)."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    tokens: int  # non-padding tokens (<bos>, document tokens and <eos>)
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    split: str
    seq_len: int
    dtype: str
    vocab_size: int
    special: SpecialTokens
    tokenizer_sha256: str
    cross_document: bool
    num_samples: int
    num_tokens: int
    num_documents: int
    shards: tuple[ShardInfo, ...]
    format: str = FORMAT
    row_prefix: str = ROW_PREFIX  # the token every sample starts with
    # SFT splits only: {"chat_template": {...}, "overflow": ..., "response_padding": "eos"}. Absent from a
    # pretraining manifest, whose JSON thus stays as it was.
    sft: dict | None = None
    path: Path | str | None = field(default=None, compare=False)  # the split directory (or URL) it was read from

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("path")
        d.pop("special")
        if self.sft is None:
            d.pop("sft")
        d["special_tokens"] = self.special.to_dict()
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path | str) -> Manifest:
        d = json.loads(text)
        if d.get("format") == "unmask-shards/1" or (d.get("format") == FORMAT and "row_prefix" not in d):
            raise DataError(f"{path}: shards written by an older unmask, whose rows do not begin with <bos> as "
                            "every sampler template does; re-run `unmask prepare-data` to rewrite them")
        if d.get("format") != FORMAT or d.get("row_prefix") != ROW_PREFIX:
            raise DataError(f"{path}/{MANIFEST}: format {d.get('format')!r} with row_prefix "
                            f"{d.get('row_prefix')!r}; this unmask reads {FORMAT!r} with {ROW_PREFIX!r}")
        d["special"] = SpecialTokens.from_dict(d.pop("special_tokens"))
        d["shards"] = tuple(ShardInfo(**s) for s in d["shards"])
        return cls(**d, path=path)


def read_manifest(split_dir: str | Path, retries: int = 3) -> Manifest:
    """The manifest of a split directory or URL prefix (`https://host/data/train`)."""
    from unmask.data.reader import is_url, join, read_bytes

    if is_url(split_dir):
        path = join(split_dir, MANIFEST)
        text = read_bytes(path, retries).decode("utf-8")
    else:
        split_dir = Path(split_dir)
        path = split_dir / MANIFEST
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: {split_dir} is not a complete split; run (or re-run) `unmask prepare-data`"
            )
        text = path.read_text()
    try:
        return Manifest.from_json(text, split_dir)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a valid unmask manifest ({type(e).__name__}: {e}); re-run prepare-data") from None


class Packer:
    """Documents' token arrays in, fixed-length samples out (see module docstring)."""

    def __init__(self, seq_len: int, special: SpecialTokens, cross_document: bool = True):
        self.seq_len, self.special, self.cross_document = seq_len, special, cross_document
        self.body = seq_len - 1  # stream tokens per sample, after its <bos>
        self._parts: list[np.ndarray] = []
        self._buffered = 0

    def add(self, tokens: np.ndarray) -> Iterator[np.ndarray]:
        doc = np.append(tokens, np.array([self.special.eos], dtype=tokens.dtype))
        if not self.cross_document:
            yield from self._cut(doc, pad=True)
            return
        self._parts.append(doc)
        self._buffered += len(doc)
        if self._buffered >= self.body:
            stream = np.concatenate(self._parts)
            full = len(stream) - len(stream) % self.body
            yield from self._cut(stream[:full], pad=False)
            self._parts = [stream[full:]]
            self._buffered = len(stream) - full

    def finish(self) -> Iterator[np.ndarray]:
        if self._buffered:
            yield from self._cut(np.concatenate(self._parts), pad=True)
        self._parts, self._buffered = [], 0

    def _cut(self, stream: np.ndarray, pad: bool) -> Iterator[np.ndarray]:
        bos = np.array([self.special.bos], dtype=stream.dtype)
        for start in range(0, len(stream), self.body):
            piece = np.concatenate([bos, stream[start : start + self.body]])
            if len(piece) < self.seq_len:
                assert pad
                piece = np.concatenate([piece, np.full(self.seq_len - len(piece), self.special.pad, piece.dtype)])
            yield piece


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """The .npy header of a 1-D array: the same for every sample, so written once (np.save per sample
    costs more than the tar entry)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(length, dtype), allow_pickle=False)
    return buf.getvalue()[: -length * np.dtype(dtype).itemsize]


class SplitWriter:
    """Writes one split's samples into tar shards of about `shard_bytes`, then its manifest."""

    def __init__(self, split_dir: Path, *, split: str, seq_len: int, vocab_size: int, special: SpecialTokens,
                 tokenizer_sha256: str, cross_document: bool, shard_bytes: int, sft: dict | None = None):
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(split=split, seq_len=seq_len, vocab_size=vocab_size, special=special,
                         tokenizer_sha256=tokenizer_sha256, cross_document=cross_document, sft=sft)
        self.mask_header = npy_header(np.dtype(np.uint8), seq_len) if sft is not None else None
        self.dtype = token_dtype(vocab_size)
        self.shard_bytes = shard_bytes
        self.pad = special.pad
        self.header = npy_header(self.dtype, seq_len)
        self.shards: list[ShardInfo] = []
        self.num_samples = self.num_tokens = self.num_documents = 0
        self._tar = self._file = None

    def write(self, sample: np.ndarray, prompt_mask: np.ndarray | None = None) -> None:
        """One sample; an SFT split's samples come with their prompt mask (bool [seq_len]), others without."""
        if (prompt_mask is None) != (self.mask_header is None):
            raise ValueError(f"{self.dir}: a prompt mask goes with every sample of an SFT split and no other")
        entries = {"tokens.npy": self.header + sample.astype(self.dtype, copy=False).tobytes()}
        if prompt_mask is not None:
            entries["prompt_mask.npy"] = self.mask_header + prompt_mask.astype(np.uint8).tobytes()
        entry = sum(TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK for data in entries.values())
        # a shard never exceeds the target unless one sample alone does
        if self._tar is not None and tar_size(self._size + entry) > self.shard_bytes:
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        self._tar.write({"__key__": sample_key(self.num_samples), **entries})
        n_tokens = int(np.count_nonzero(sample != self.pad))
        self._size += entry
        self._samples += 1
        self._tokens += n_tokens
        self.num_samples += 1
        self.num_tokens += n_tokens

    def close(self) -> Manifest:
        if self._tar is not None:
            self._close_shard()
        manifest = Manifest(dtype=self.dtype.name, num_samples=self.num_samples, num_tokens=self.num_tokens,
                            num_documents=self.num_documents, shards=tuple(self.shards), **self.meta)
        atomic_write_text(self.dir / MANIFEST, manifest.to_json())
        return dataclasses.replace(manifest, path=self.dir)

    def _open_shard(self) -> None:
        self._name = shard_name(len(self.shards))
        self._file = HashingWriter(open(partial_path(self.dir / self._name), "wb"))
        import webdataset as wds  # imports torch (seconds): only once there is something to write

        # mtime=0: the same input gives byte-identical shards (stable sha256 across re-runs)
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        # ustar: our short names need no pax headers, which tarfile builds slowly. (TarWriter 1.0.2
        # accepts format= but never hands it to tarfile, hence setting it on the stream.)
        self._tar.tarstream.format = tarfile.USTAR_FORMAT
        self._size = self._samples = self._tokens = 0

    def _close_shard(self) -> None:
        self._tar.close()
        self._file.close()
        tmp, final = partial_path(self.dir / self._name), self.dir / self._name
        info = ShardInfo(self._name, self._samples, self._tokens, self._file.size, self._file.hexdigest())
        commit(tmp, final)
        self.shards.append(info)
        self._tar = self._file = None

