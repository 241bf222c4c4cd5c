"""Weighted mixtures, one read per shard per epoch, and the integrity check done in the reading pass."""

from __future__ import annotations

import hashlib
import itertools
import shutil
from types import SimpleNamespace

import pytest

from unmask.data import reader
from unmask.data.loader import ShardLoader, read_manifest
from unmask.errors import DataError


def mixture(tiny_shards, batch, rank=0, world=1, **kw):
    srcs = [(str(tiny_shards / "train"), 0.7), (str(tiny_shards / "val"), 0.3)]
    return ShardLoader(None, batch, seq_len=128, model_vocab_size=512, dp_rank=rank, dp_world=world, seed=9,
                       sources=srcs, mix_shards=2, **kw)


def test_mixture_follows_the_weights_in_every_layout(tiny_shards):
    steps = 100
    one = mixture(tiny_shards, 8)
    list(itertools.islice(iter(one), steps))
    tokens = one.source_tokens
    total = sum(tokens.values())
    assert total == steps * 8 * 128
    shares = [n / total for n in tokens.values()]
    assert abs(shares[0] - 0.7) < 0.02 * 0.7 and abs(shares[1] - 0.3) < 0.02 * 0.3
    two = [mixture(tiny_shards, 4, rank=r, world=2, num_workers=2) for r in range(2)]
    for ld in two:
        list(itertools.islice(iter(ld), steps))
    assert two[0].source_tokens == two[1].source_tokens == tokens  # the same draws at DP=1 and DP=2
    assert set(one.log_fields()) == {"tokens_data_train", "tokens_data_val"}
    ranks = [sum(ld.rank_source_tokens.values()) for ld in two]  # what each rank actually read, non-padding
    assert sum(ranks) == pytest.approx(sum(one.rank_source_tokens.values()), rel=0.02)


def test_mixture_resumes_exactly(tiny_shards):
    full = list(itertools.islice(iter(mixture(tiny_shards, 8, num_workers=2)), 30))
    first = mixture(tiny_shards, 8, num_workers=2)
    list(itertools.islice(iter(first), 13))
    again = mixture(tiny_shards, 8, num_workers=2)
    again.load_state_dict(first.state_dict())
    assert all((a == b).all() for a, b in zip(itertools.islice(iter(again), 17), full[13:], strict=True))
    assert again.source_tokens == mixture_tokens_after(tiny_shards, 30)


def mixture_tokens_after(tiny_shards, steps):
    ld = mixture(tiny_shards, 8)
    list(itertools.islice(iter(ld), steps))
    return ld.source_tokens


def test_sources_with_another_tokenizer_are_refused(tiny_shards, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_shards / "val", odd / "val")
    m = (odd / "val" / "manifest.json").read_text()
    sha = read_manifest(tiny_shards / "val").tokenizer_sha256
    (odd / "val" / "manifest.json").write_text(m.replace(sha, "0" * 64))
    with pytest.raises(DataError, match=rf"differs from the tokenizer of {odd / 'val'}"):
        ShardLoader(None, 4, seq_len=128, model_vocab_size=512,
                    sources=[(str(tiny_shards / "train"), 1.0), (str(odd / "val"), 1.0)])


def test_each_shard_is_read_and_hashed_once_per_epoch(tiny_shards, monkeypatch):
    """One epoch of 2 loader workers: every shard read once, its bytes hashed once, in the same pass."""
    hashed = []

    class Counting:
        def __init__(self):
            self.h = hashlib.sha256()

        def update(self, block):
            hashed.append(len(block))
            self.h.update(block)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(reader, "hashlib", SimpleNamespace(sha256=Counting))
    m = read_manifest(tiny_shards / "train")
    ld = ShardLoader(tiny_shards / "train", 8, seq_len=128, model_vocab_size=512, seed=2, mix_shards=2)
    it = iter(ld)
    while not all((ld.sources[0].name, 0, s.name) in ld.shard_reads for s in m.shards):
        next(it)
    epoch0 = {k: v for k, v in ld.shard_reads.items() if k[1] == 0}
    assert sorted(epoch0.values()) == [1] * len(m.shards)
    assert sum(hashed) == ld.bytes_read  # every byte read was hashed once, none re-read to hash it
    assert ld.bytes_read <= sum(s.bytes for s in m.shards) + 2 * max(s.bytes for s in m.shards)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_flipped_byte_stops_training_reads_naming_the_shard(tiny_shards, tmp_path, workers):
    shutil.copytree(tiny_shards, tmp_path / "data")
    split = tmp_path / "data" / "train"
    shard = read_manifest(split).shards[3]
    data = bytearray((split / shard.name).read_bytes())
    data[1700] ^= 0x01  # inside sample 1's tokens: the tar stays parseable
    (split / shard.name).write_bytes(bytes(data))
    ld = ShardLoader(split, 8, seq_len=128, model_vocab_size=512, num_workers=workers, mix_shards=2)
    with pytest.raises(DataError, match=rf"shard .*{shard.name} is corrupted"):
        list(itertools.islice(iter(ld), 400))
