"""Atomic file writes and hashing shared by the writer, the corpora cache and the loader.

A file is written under a temporary name in the same directory, flushed to disk, then renamed over
its final name: a reader sees either nothing or the whole file, never a prefix of it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PARTIAL = ".partial"  # suffix of files still being written; never read as data


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL)


def commit(tmp: Path, path: Path) -> None:
    """fsync `tmp`, then rename it to `path` (atomic on POSIX within one filesystem)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = partial_path(path)
    tmp.write_bytes(data)
    commit(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HashingWriter:
    """A binary file wrapper that hashes what passes through it: the writer knows a file's digest
    without reading it back."""

    def __init__(self, f):
        self.f, self.h, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.h.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
