"""Streaming, exactly resumable reader of prepare-data shards for one data-parallel rank.

Order. Epoch e visits every one of the split's N samples once, in an order fixed by (seed, e): the
shards are permuted, cut into groups of `mix_shards` consecutive shards, and the samples within each
group permuted. Epochs follow each other, so a global position p >= 0 names the sample at place p % N
of epoch p // N's order. shuffle=False keeps the write order in every epoch.

Partition. A global step takes B*W consecutive positions (B: batch size, W: data-parallel world):
rank r's k-th batch is positions start + k*B*W + r*B + [0, B). DataLoader worker w of K makes the
rank's batches k = w, w+K, ... and the DataLoader hands them out in order k = 0, 1, 2, ..., so a
rank's stream does not depend on K. A batch may straddle two epochs.

State and guarantee. After a rank consumed n batches its state is the global position
start + n*B*W (plus the epoch, p // N). When every rank has consumed the same number of batches (as
in synchronous data parallelism), all ranks report the same position P, and the positions below P
were each seen exactly once across ranks and workers. Restoring sets start = P, so a run resumed with
another world size, batch size or worker count continues the same epoch order without repeating or
skipping a sample; with the same W and B the batches equal the uninterrupted run's.

Reading. Each worker reads the shards of a group it needs through webdataset's tar iterators, keeps
only its own samples and emits them in position order. Every worker reads every shard it has a
sample in (for a shuffled group, all of them): this I/O (ranks x workers x data per epoch) is the
price of an order independent of the partition. Memory: one shard's bytes plus the worker's share of
a group.

Integrity. A shard's size and sha256 are checked against the manifest before any of its samples is
used. on_corrupt="error" stops with a DataError naming the shard; "skip" warns, counts the shard in
`.skipped_shards` and yields none of its samples (workers fill their batches from their next
positions, so a resume after a skip may repeat up to that many samples).

loop=False (validation): one pass over epoch 0's order, from its start at every `iter()` (or from a
loaded state, once). Each rank's last batch may be smaller (kept unless drop_last=True), and ranks
may get different numbers of batches.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unmask.data.fsutil import sha256_bytes, sha256_file
from unmask.data.shards import MANIFEST, Manifest, ShardInfo, read_manifest
from unmask.errors import DataError

__all__ = ["Manifest", "ShardLoader", "read_manifest", "CorruptShardWarning"]


class CorruptShardWarning(UserWarning):
    """A shard failed its integrity check and was skipped (on_corrupt="skip")."""


class _Corrupt(Exception):
    pass


@dataclass(frozen=True)
class _Group:
    epoch: int
    index: int
    start: int  # global position of its first sample
    size: int
    shards: tuple[int, ...]  # manifest indices, in read order
    ends: tuple[int, ...]  # cumulative sample counts of those shards


class _Order:
    """The epoch orders: a pure function of the shards' sample counts, seed, shuffle and mix_shards."""

    def __init__(self, counts: list[int], seed: int, shuffle: bool, mix_shards: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.n = int(self.counts.sum())
        self.seed, self.shuffle, self.mix = seed, shuffle, mix_shards
        self._epochs: dict[int, tuple[list[_Group], np.ndarray]] = {}

    def groups(self, epoch: int) -> list[_Group]:
        if epoch not in self._epochs:
            s = len(self.counts)
            order = np.random.default_rng([self.seed, epoch]).permutation(s) if self.shuffle else np.arange(s)
            groups, start = [], epoch * self.n
            for gi, i in enumerate(range(0, s, self.mix)):
                shards = tuple(int(x) for x in order[i : i + self.mix])
                ends = tuple(int(x) for x in np.cumsum(self.counts[list(shards)]))
                groups.append(_Group(epoch, gi, start, ends[-1], shards, ends))
                start += ends[-1]
            # one epoch at a time is all a worker needs
            self._epochs = {epoch: (groups, np.array([g.start for g in groups]))}
        return self._epochs[epoch][0]

    def group_of(self, p: int) -> _Group:
        groups = self.groups(p // self.n)
        starts = self._epochs[p // self.n][1]
        return groups[int(np.searchsorted(starts, p, side="right")) - 1]

    def locate(self, g: _Group, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offsets within the group -> (index into g.shards, sample index within that shard)."""
        if self.shuffle:
            perm = np.random.default_rng([self.seed, g.epoch, g.index, 1]).permutation(g.size)
            offsets = perm[offsets]
        slot = np.searchsorted(g.ends, offsets, side="right")
        firsts = np.concatenate([[0], g.ends[:-1]])
        return slot, offsets - firsts[slot]


class _RankStream(IterableDataset):
    """One rank's batches; each DataLoader worker makes its share (k = w, w+K, ...)."""

    def __init__(self, manifest: Manifest, order: _Order, *, batch_size: int, rank: int, world: int,
                 start: int, end: int | None, on_corrupt: str, drop_last: bool):
        self.m, self.order = manifest, order
        self.b, self.rank, self.world = batch_size, rank, world
        self.start, self.end, self.on_corrupt, self.drop_last = start, end, on_corrupt, drop_last

    def __iter__(self):
        info = get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        return _Worker(self, w, k).batches()


class _Worker:
    def __init__(self, s: _RankStream, w: int, k: int):
        self.s, self.w, self.k = s, w, k
        self.group: _Group | None = None
        self.cache: dict[int, np.ndarray] = {}
        self.skipped: dict[str, str] = {}  # shard name -> reason
        self.reported: set[str] = set()

    def base(self, k: int) -> int:
        s = self.s
        return s.start + k * s.b * s.world + s.rank * s.b

    def positions(self, lo: int = 0, hi: float = math.inf) -> Iterator[int]:
        """This worker's positions in [lo, hi), in order."""
        s, step = self.s, self.s.b * self.s.world
        k = max(0, -(-(lo - self.base(0) - s.b + 1) // step))  # first batch ending after lo
        k += (self.w - k) % self.k
        while True:
            base = self.base(k)
            if base >= hi or (s.end is not None and base >= s.end):
                return
            yield from range(max(base, lo), min(base + s.b, hi, s.end if s.end is not None else math.inf))
            k += self.k

    def batches(self) -> Iterator[tuple[torch.Tensor, tuple[str, ...], str]]:
        buf: list[np.ndarray] = []
        try:
            for q in self.positions():
                sample = self.sample(q)
                if sample is not None:
                    buf.append(sample)
                if len(buf) == self.s.b:
                    yield self.emit(buf)
                    buf = []
            if buf and not self.s.drop_last:
                yield self.emit(buf)
        except _Corrupt as e:  # passed as data: a worker's exception would reach the user wrapped in a traceback
            yield torch.empty(0, dtype=torch.long), (), str(e)

    def emit(self, buf: list[np.ndarray]) -> tuple[torch.Tensor, tuple[str, ...], str]:
        new = tuple(f"{n}\t{r}" for n, r in self.skipped.items() if n not in self.reported)
        self.reported.update(self.skipped)
        return torch.from_numpy(np.stack(buf).astype(np.int64)), new, ""

    def sample(self, q: int) -> np.ndarray | None:
        g = self.group
        if g is None or not g.start <= q < g.start + g.size:
            self.load(self.s.order.group_of(q), q)
        return self.cache.pop(q, None)  # None: its shard was skipped

    def load(self, g: _Group, q: int) -> None:
        """Read the group's shards and keep this worker's samples from position q to the group's end."""
        self.group, self.cache = g, {}
        mine = np.fromiter(self.positions(q, g.start + g.size), dtype=np.int64)
        slots, idx = self.s.order.locate(g, mine - g.start)
        for slot in np.unique(slots):
            shard = self.s.m.shards[g.shards[slot]]
            wanted = dict(zip(idx[slots == slot].tolist(), mine[slots == slot].tolist(), strict=True))
            for i, arr in self.read(shard, wanted):
                self.cache[wanted[i]] = arr

    def read(self, shard: ShardInfo, wanted: dict[int, int]) -> Iterator[tuple[int, np.ndarray]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        path = Path(self.s.m.path) / shard.name
        try:
            data = self.verified(path, shard)
        except _Corrupt as e:
            if self.s.on_corrupt == "error":
                raise
            self.skipped[shard.name] = str(e)
            return
        out, count = [], 0
        source = [{"url": str(path), "stream": io.BytesIO(data)}]
        try:
            for i, sample in enumerate(group_by_keys(tar_file_expander(source))):
                count += 1
                if i in wanted:
                    arr = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
                    if arr.shape != (self.s.m.seq_len,):
                        raise ValueError(f"sample {sample['__key__']} has shape {arr.shape}")
                    out.append((i, arr))
        except Exception as e:  # the hash matched, so the manifest itself describes a broken shard
            raise _Corrupt(f"shard {path} cannot be parsed ({e}); re-run `unmask prepare-data`") from None
        if count != shard.samples:
            raise _Corrupt(f"shard {path} holds {count} samples, its manifest says {shard.samples}")
        yield from out

    def verified(self, path: Path, shard: ShardInfo) -> bytes:
        fix = "re-run `unmask prepare-data` to rewrite it, or set data.on_corrupt=skip to skip it"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise _Corrupt(f"shard {path} cannot be read ({e.strerror}); {fix}") from None
        if len(data) != shard.bytes:
            what = "truncated" if len(data) < shard.bytes else "too long"
            raise _Corrupt(f"shard {path} is {what}: {len(data)} bytes, the manifest says {shard.bytes}; {fix}")
        if sha256_bytes(data) != shard.sha256:
            raise _Corrupt(f"shard {path} is corrupted: its sha256 differs from the manifest's; {fix}")
        return data


class ShardLoader:
    """Batches `torch.LongTensor [batch_size, seq_len]` of one data-parallel rank (see module docstring)."""

    def __init__(self, split_dir: str | Path, batch_size: int, *, seq_len: int, model_vocab_size: int,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, num_workers: int = 0, loop: bool = True,
                 shuffle: bool = True, on_corrupt: str = "error", drop_last: bool = False, mix_shards: int = 8,
                 tokenizer_path: str | Path | None = None):
        if not (batch_size > 0 and 0 <= dp_rank < dp_world and num_workers >= 0 and mix_shards > 0):
            raise ValueError(f"bad loader layout: batch_size={batch_size} dp_rank={dp_rank} dp_world={dp_world} "
                             f"num_workers={num_workers} mix_shards={mix_shards}")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt={on_corrupt!r}; allowed: error, skip")
        self.manifest = m = read_manifest(split_dir)
        where = Path(split_dir) / MANIFEST
        if m.seq_len != seq_len:
            raise DataError(f"{where}: shards have seq_len={m.seq_len} but {seq_len} was asked for; set "
                            f"train.seq_len={m.seq_len} or re-run prepare-data with --seq-len {seq_len}")
        if m.vocab_size > model_vocab_size:
            raise DataError(f"{where}: the tokenizer has {m.vocab_size} pieces but "
                            f"model.vocab_size={model_vocab_size}; set model.vocab_size >= {m.vocab_size}")
        tok = Path(tokenizer_path) if tokenizer_path else Path(split_dir).parent / "tokenizer.model"
        if not tok.is_file():
            raise DataError(f"{tok} does not exist; the shards in {split_dir} need the tokenizer prepare-data wrote")
        if sha256_file(tok) != m.tokenizer_sha256:
            raise DataError(f"{tok} is not the tokenizer the shards in {split_dir} were made with (sha256 differs "
                            f"from {where}); re-run prepare-data or point at the matching tokenizer")
        if m.num_samples == 0:
            raise DataError(f"{where}: the split has no samples; re-run prepare-data with more text "
                            "(or --val-fraction > 0 for val), or leave this split out of the config")
        self.batch_size, self.rank, self.world, self.seed = batch_size, dp_rank, dp_world, seed
        self.num_workers, self.loop, self.shuffle, self.on_corrupt = num_workers, loop, shuffle, on_corrupt
        self.drop_last, self.mix_shards = drop_last, mix_shards
        self._order = _Order([s.samples for s in m.shards], seed, shuffle, mix_shards)
        self._position = 0  # global position consumed by all ranks (loop=True) / within this pass
        self._resume: int | None = None  # loop=False: a loaded position, used by the next iter() only
        self._skipped: dict[str, str] = {}

    @property
    def skipped_shards(self) -> int:
        """How many distinct shards were skipped as corrupted (on_corrupt="skip")."""
        return len(self._skipped)

    @property
    def epoch(self) -> int:
        return self._position // self.manifest.num_samples

    def __iter__(self) -> Iterator[torch.Tensor]:
        n_all = self.manifest.num_samples
        if self.loop:
            start, end = self._position, None
        else:
            start, end, self._resume = (self._resume or 0), n_all, None
        stream = _RankStream(self.manifest, self._order, batch_size=self.batch_size, rank=self.rank,
                             world=self.world, start=start, end=end, on_corrupt=self.on_corrupt,
                             drop_last=self.drop_last)
        if self.num_workers == 0:
            source = iter(stream)
        else:
            source = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers))
        self._position = start
        step = self.batch_size * self.world
        for n, (tokens, skipped, error) in enumerate(source, 1):
            if error:
                raise DataError(error)
            for item in skipped:
                name, reason = item.split("\t", 1)
                if name not in self._skipped:
                    self._skipped[name] = reason
                    warnings.warn(f"skipping {reason}", CorruptShardWarning, stacklevel=2)
            self._position = start + n * step if end is None else min(start + n * step, end)
            yield tokens

    def state_dict(self) -> dict:
        return {"position": self._position, "epoch": self.epoch, "num_samples": self.manifest.num_samples,
                "seed": self.seed, "shuffle": self.shuffle, "mix_shards": self.mix_shards,
                "dp_world": self.world, "batch_size": self.batch_size, "skipped_shards": sorted(self._skipped)}

    def load_state_dict(self, sd: dict) -> None:
        mine = self.state_dict()
        for key in ("num_samples", "seed", "shuffle", "mix_shards"):  # these define the order itself
            if sd.get(key) != mine[key]:
                raise DataError(f"loader state has {key}={sd.get(key)!r} but this loader has {mine[key]!r} "
                                f"({self.manifest.path}); the saved position would not name the same samples")
        self._position = int(sd["position"])
        if not self.loop:
            self._resume = self._position
        for name in sd.get("skipped_shards", []):
            self._skipped.setdefault(name, "skipped before the resume")
