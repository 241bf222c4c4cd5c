"""Corpus inputs: expand files, directories and globs; read documents; assign each to train or val.

A plain text file is one document. A `.jsonl`/`.json` file is JSON Lines: one object per line, the
document being one string field (`text` by default). Text is read exactly as stored (no newline
translation) so that tokenize -> detokenize gives the file's text back.

The split is a function of the document alone: a document goes to val when the first 8 bytes of the
sha256 of its UTF-8 text, read as a fraction of 2**64, fall below `val_fraction`. Adding, removing or
reordering other inputs never moves a document between splits, and duplicates land together.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from unmask.errors import DataError

JSONL_SUFFIXES = {".jsonl", ".json"}
# Inside a directory only these are read, so stray binaries (.DS_Store, images) are not taken for text.
# A file named explicitly, or matched by a glob, is read whatever its suffix.
DIR_SUFFIXES = {".txt", ".text", ".md", ".rst"} | JSONL_SUFFIXES


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (recursively) and globs -> sorted, de-duplicated list of files."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in DIR_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"input directory {item} holds no {'/'.join(sorted(DIR_SUFFIXES))} files")
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"input {item!r} is not a file or directory and matches no file as a glob")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise DataError("no input files given; pass text files, directories or globs")
    return unique


def iter_documents(paths: list[Path], jsonl_field: str = "text") -> Iterator[str]:
    """Every non-empty document of every file, in order."""
    for path in paths:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, jsonl_field)
        else:
            text = read_text(path)
            if text:
                yield text


def read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as stored
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); convert it or leave it out") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); JSON Lines need one object per line") from None
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{path}:{lineno}: no string field {field!r} (found {keys}); set --jsonl-field")
        if text:
            yield text


def document_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def digest_fraction(digest: bytes) -> float:
    """The digest's first 8 bytes as a number in [0, 1): the document's position for the split."""
    return int.from_bytes(digest[:8], "big") / 2.0**64
