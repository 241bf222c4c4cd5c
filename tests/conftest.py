"""Shared fixtures: a real corpus (Shakespeare, downloaded once into a persistent cache) and small
prepared shards that the data, trainer and end-to-end tests read."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from unmask.data.corpora import fetch_shakespeare
from unmask.data.prepare import PrepareOptions, prepare_data

# Persistent across test runs so that only the first run needs the network (set to relocate it).
CACHE = Path(os.environ.get("UNMASK_CACHE_DIR", Path.home() / ".cache" / "unmask"))

# Short works, ~0.4 MB of text: ~1250 train samples of 128 tokens in 33 shards, ~450 val samples (3 works).
TINY_WORKS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
              "rape_of_lucrece", "comedy_of_errors", "tempest")


def pytest_collection_modifyitems(items):
    """Tiers by folder, so no new test can forget its marker: tests/e2e/ is slow, tests/distributed/ is
    distributed, and every distributed test is slow; `make test-fast` runs the rest plus the smoke test."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "distributed" in parts:
            item.add_marker(pytest.mark.distributed)
        if "e2e" in parts or item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny-model calls (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny model
    gains nothing from more threads, and on a busy machine their hand-offs cost 100x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """Directory of cleaned Shakespeare works, one UTF-8 .txt per work."""
    return fetch_shakespeare(CACHE / "corpora")


@pytest.fixture(scope="session")
def tiny_corpus(shakespeare_dir) -> list[Path]:
    return [shakespeare_dir / f"{w}.txt" for w in TINY_WORKS]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_corpus) -> Path:
    """prepare-data OUT dir (tokenizer.model, tokenizer.json, train/, val/): vocab 512 (model size
    `tiny`), seq_len 128, ~50 KB shards. Read-only: copy it before damaging anything."""
    out = tmp_path_factory.mktemp("tiny_shards") / "data"
    prepare_data(PrepareOptions(inputs=[str(p) for p in tiny_corpus], out=out, vocab_size=512, seq_len=128,
                                val_fraction=0.45, shard_size_mb=0.05, workers=2, progress=False))
    return out


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory, shakespeare_dir) -> Path:
    """All 42 works (5 MB) as prepare-data output, vocab 512, seq_len 128, ~5% held out by document hash:
    enough unseen-in-training text that a model has to generalise, for the training-quality check."""
    out = tmp_path_factory.mktemp("shakespeare_shards") / "data"
    prepare_data(PrepareOptions(inputs=[str(shakespeare_dir)], out=out, vocab_size=512, seq_len=128,
                                val_fraction=0.05, workers=2, progress=False))
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M's GGUF file from the eval extra (skips where that optional extra is not installed)."""
    from unmask.eval.genppl import smollm2_path

    try:
        return smollm2_path()
    except Exception as e:  # noqa: BLE001 - any failure to find the optional extra
        pytest.skip(str(e))


@pytest.fixture
def own_signal_handlers():
    """A preempted run leaves SIGTERM/SIGINT ignored (so a duplicate signal cannot kill its exit): undo that here."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
