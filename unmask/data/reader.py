"""Reading shard bytes from a directory or a URL, with the integrity check done in the same pass.

A location is a local directory or an `http(s)://` / `s3://` (any fsspec protocol) prefix. Remote reads are
retried with backoff; the last failure stops with a DataError naming the URL.

Integrity. A shard is streamed once: its sha256 is updated block by block while the bytes arrive, and its
size and digest are compared with the manifest's before any sample is parsed. No shard is read a second time
to verify it, and prepare-data computes the digest while writing (fsutil.HashingWriter).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from unmask.errors import DataError

BLOCK = 1 << 20
FIX = "re-run `unmask prepare-data` to rewrite it, or set data.on_corrupt=skip to skip it"


class Corrupt(Exception):
    """A shard failed its check; the message names it."""


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str | Path, name: str) -> str:
    return f"{str(location).rstrip('/')}/{name}" if is_url(location) else str(Path(location) / name)


def parent(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[0] if is_url(location) else str(Path(location).parent)


def _open(where: str):
    if not is_url(where):
        return open(where, "rb")
    try:
        import fsspec
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError(f"{where}: reading URLs needs fsspec; `pip install 'fsspec[http]'`") from None
    # block_size=0 streams http(s) in one request: no range requests, which plain servers may not support
    opts = {"block_size": 0} if where.startswith(("http://", "https://")) else {}
    return fsspec.open(where, "rb", **opts).open()


def read_bytes(where: str, retries: int = 3, backoff: float = 0.5) -> bytes:
    """Whole file; remote failures are retried `retries` times."""
    return b"".join(stream_blocks(where, retries, backoff))


def stream_blocks(where: str, retries: int = 3, backoff: float = 0.5) -> Iterator[bytes]:
    """The file's blocks. A failure before the first block is retried; one after it restarts the read."""
    for attempt in range(retries + 1):
        try:
            blocks = []
            with _open(where) as f:
                for block in iter(lambda: f.read(BLOCK), b""):
                    blocks.append(block)
            yield from blocks
            return
        except FileNotFoundError:
            if not is_url(where):
                raise DataError(f"{where} does not exist; check data.train_dir / data.sources") from None
            if attempt == retries:  # fsspec also says this when the server cannot be reached
                raise DataError(f"cannot read {where} after {attempt + 1} attempt(s) (not found or unreachable); "
                                "check the URL and the network, or raise data.retries") from None
            time.sleep(backoff * 2**attempt)
        except Exception as e:  # network errors come in many types (aiohttp, botocore, OSError)
            if not is_url(where) or attempt == retries:
                why = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
                raise DataError(f"cannot read {where} after {attempt + 1} attempt(s) ({why}); check the path or "
                                "URL and the network, or raise data.retries") from None
            time.sleep(backoff * 2**attempt)


def verified_shard(where: str, size: int, sha256: str, retries: int) -> bytes:
    """The shard's bytes, hashed while they stream in; raises Corrupt on a size or digest mismatch."""
    h, parts, n = hashlib.sha256(), [], 0
    try:
        for block in stream_blocks(where, retries):
            h.update(block)
            parts.append(block)
            n += len(block)
    except DataError as e:
        raise Corrupt(f"shard {e}; {FIX}") from None
    if n != size:
        what = "truncated" if n < size else "too long"
        raise Corrupt(f"shard {where} is {what}: {n} bytes, the manifest says {size}; {FIX}")
    if h.hexdigest() != sha256:
        raise Corrupt(f"shard {where} is corrupted: its sha256 differs from the manifest's; {FIX}")
    return b"".join(parts)


# A sample as the reader hands it on: its tokens, or for an SFT split (tokens, prompt mask as bool)
Sample = np.ndarray | tuple[np.ndarray, np.ndarray]


def tokens_of(sample: Sample) -> np.ndarray:
    return sample[0] if isinstance(sample, tuple) else sample


def collate(samples: list[Sample]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A batch: tokens [B, L] int64, with the prompt mask [B, L] bool beside them for SFT samples."""
    if isinstance(samples[0], tuple):
        return (torch.from_numpy(np.stack([t for t, _ in samples]).astype(np.int64)),
                torch.from_numpy(np.stack([m for _, m in samples])))
    return torch.from_numpy(np.stack(samples).astype(np.int64))


def parse_samples(where: str, data: bytes, expected: int, seq_len: int, sft: bool = False) -> list[Sample]:
    """Every sample of a verified shard, in write order; with `sft`, each with its prompt mask."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    out = []
    try:
        for sample in group_by_keys(tar_file_expander([{"url": where, "stream": io.BytesIO(data)}])):
            arr = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            if arr.shape != (seq_len,):
                raise ValueError(f"sample {sample['__key__']} has shape {arr.shape}")
            if sft:
                mask = np.load(io.BytesIO(sample["prompt_mask.npy"]), allow_pickle=False)
                if mask.shape != (seq_len,):
                    raise ValueError(f"sample {sample['__key__']} has a prompt mask of shape {mask.shape}")
                arr = (arr, mask.astype(bool))
            out.append(arr)
    except Exception as e:  # the hash matched, so the manifest itself describes a broken shard
        raise Corrupt(f"shard {where} cannot be parsed ({e}); re-run `unmask prepare-data`") from None
    if len(out) != expected:
        raise Corrupt(f"shard {where} holds {len(out)} samples, its manifest says {expected}")
    return out
