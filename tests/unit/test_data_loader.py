"""ShardLoader: order, exact resume, re-partition, start-up checks and corrupted shards."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from unmask.data.loader import CorruptShardWarning, ShardLoader, read_manifest
from unmask.errors import DataError

SEQ, VOCAB = 128, 512


def loader(split, batch=8, **kw):
    return ShardLoader(split, batch, seq_len=SEQ, model_vocab_size=VOCAB, **kw)


def take(ld, n):
    return list(itertools.islice(iter(ld), n))


def rows(batches):
    return [tuple(r.tolist()) for b in batches for r in b]


@pytest.fixture(scope="module")
def all_rows(tiny_shards):
    """Every train sample in write order (they are all distinct, which the checks below rely on)."""
    r = rows(loader(tiny_shards / "train", 64, loop=False, shuffle=False))
    assert len(set(r)) == len(r) == read_manifest(tiny_shards / "train").num_samples
    return r


@pytest.fixture
def damaged(tiny_shards, tmp_path):
    """A private copy of tiny_shards to break."""
    out = tmp_path / "data"
    shutil.copytree(tiny_shards, out)
    return out


def test_batches_and_epochs(tiny_shards, all_rows):
    n = len(all_rows)
    # a group of mix_shards shards straddles two epochs unless it divides the shard count: one group per epoch
    mix = len(read_manifest(tiny_shards / "train").shards)
    ld = loader(tiny_shards / "train", 8, seed=1, mix_shards=mix)
    batches = take(ld, 2 * n // 8 + 1)
    assert all(b.dtype == torch.long and b.shape == (8, SEQ) for b in batches)
    got = rows(batches)
    first, second = got[:n], got[n : 2 * n]
    assert sorted(first) == sorted(all_rows) and sorted(second) == sorted(all_rows)  # each epoch: all, once
    assert first != all_rows and first != second  # shuffled, and reshuffled per epoch
    assert ld.epoch == 2 and ld.state_dict()["position"] == len(got)
    assert rows(take(loader(tiny_shards / "train", 8, seed=1, mix_shards=mix), 5)) == got[:40]  # same seed, order
    assert rows(take(loader(tiny_shards / "train", 8, seed=2, mix_shards=mix), 5)) != got[:40]


def test_validation_pass(tiny_shards, all_rows):
    ld = loader(tiny_shards / "train", 100, loop=False, shuffle=False)
    batches = list(ld)
    assert [len(b) for b in batches] == [100] * (len(all_rows) // 100) + [len(all_rows) % 100]  # last kept
    assert rows(batches) == all_rows
    assert rows(ld) == all_rows  # every iter() is the same pass
    dropped = list(loader(tiny_shards / "train", 100, loop=False, shuffle=False, drop_last=True))
    assert len(dropped) == len(all_rows) // 100


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_uninterrupted(tiny_shards, workers):
    full = take(loader(tiny_shards / "train", 8, seed=3, num_workers=workers), 30)
    first = loader(tiny_shards / "train", 8, seed=3, num_workers=workers)
    assert all(torch.equal(a, b) for a, b in zip(take(first, 11), full[:11], strict=True))
    state = first.state_dict()
    resumed = loader(tiny_shards / "train", 8, seed=3, num_workers=workers)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 19), full[11:], strict=True))


def test_worker_count_is_part_of_the_layout(tiny_shards, all_rows):
    """Workers are slots that read their own shards: another worker count deals differently, each covers the epoch."""
    n = len(all_rows)
    for workers in (0, 2):
        got = rows(take(loader(tiny_shards / "train", 8, seed=4, num_workers=workers, mix_shards=2), 2 * n // 8))
        assert sorted(set(got)) == sorted(all_rows) and max(got.count(r) for r in set(got)) <= 3


def test_resume_with_another_world_size_sees_each_sample_once(tiny_shards, all_rows):
    """2 ranks x batch 8 for 20 steps, then 3 ranks x batch 5 x 2 workers: within the epoch no sample is repeated
    and none skipped (up to the ragged epoch boundary of the dealt slots: slots x mix_shards shards)."""
    split, n = tiny_shards / "train", len(all_rows)
    first = [loader(split, 8, dp_rank=r, dp_world=2, seed=5, mix_shards=2) for r in range(2)]
    per_rank = [take(ld, 20) for ld in first]
    state = first[0].state_dict()
    other = first[1].state_dict()
    assert (state["position"], state["plans"]) == (other["position"], other["plans"]) and state["position"] == 320
    after = [loader(split, 5, dp_rank=r, dp_world=3, seed=5, num_workers=2, mix_shards=2) for r in range(3)]
    for ld in after:
        ld.load_state_dict(state)
    tails = [take(ld, -(-(2 * n - 320) // 15)) for ld in after]
    consumed = [row for step in zip(*per_rank, strict=True) for b in step for row in rows([b])]
    consumed += [row for step in zip(*tails, strict=True) for b in step for row in rows([b])]
    slack = 6 * 2 * max(s.samples for s in read_manifest(split).shards) + 15
    assert len(set(consumed[: n - slack])) == n - slack  # nothing repeated
    assert set(consumed[: n + slack]) == set(all_rows)  # nothing skipped
    assert all(consumed.count(r) <= 3 for r in set(consumed))


def test_state_from_another_order_is_refused(tiny_shards):
    state = loader(tiny_shards / "train", seed=1).state_dict()
    with pytest.raises(DataError, match="loader state has seed=1 but this loader has 2"):
        loader(tiny_shards / "train", seed=2).load_state_dict(state)


def test_startup_checks_name_the_file_and_values(tiny_shards, damaged):
    with pytest.raises(DataError, match=r"train/manifest\.json: shards have seq_len=128 but 256"):
        ShardLoader(tiny_shards / "train", 8, seq_len=256, model_vocab_size=VOCAB)
    with pytest.raises(DataError, match=r"tokenizer has 512 pieces but model.vocab_size=300"):
        ShardLoader(tiny_shards / "train", 8, seq_len=SEQ, model_vocab_size=300)
    (damaged / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(DataError, match=r"data/tokenizer\.model is not the tokenizer the shards .* were made with"):
        loader(damaged / "train")
    with pytest.raises(DataError, match=r"nowhere/manifest\.json does not exist"):
        loader(damaged / "nowhere")


def corrupt(split, how):
    m = read_manifest(split)
    shard = m.shards[len(m.shards) // 2]
    path = split / shard.name
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # flip bytes inside a sample's tokens: the tar headers stay valid
        for i in range(1700, 1710):  # sample 1: header at 1024, .npy at 1536, its tokens from 1664
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupted_shard_stops_the_run_naming_it(damaged, how, workers):
    shard = corrupt(damaged / "train", how)
    word = "truncated" if how == "truncate" else "corrupted"
    with pytest.raises(DataError, match=rf"shard .*{shard.name} is {word}"):
        list(loader(damaged / "train", 16, loop=False, shuffle=False, num_workers=workers))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_skip_mode_counts_what_it_skipped(damaged, all_rows, how):
    shard = corrupt(damaged / "train", how)
    ld = loader(damaged / "train", 16, loop=False, num_workers=2, on_corrupt="skip")
    with pytest.warns(CorruptShardWarning, match=shard.name):
        got = rows(ld)
    assert ld.skipped_shards == 1 and ld.state_dict()["skipped_shards"] == [shard.name]
    assert len(got) == len(all_rows) - shard.samples and set(got) < set(all_rows)


def test_batches_are_token_ids(tiny_shards):
    batch = take(loader(tiny_shards / "train", 4), 1)[0]
    assert batch.min() >= 0 and batch.max() < VOCAB
