"""One ordered pass over a split, partitioned by global position (validation and evaluation: loop=False).

Order: the split's samples in write order (shuffle=False) or permuted within groups of `mix_shards` shards.
A global step takes B*W consecutive positions: rank r's k-th batch is positions start + k*B*W + r*B + [0, B), so
the batches do not depend on the layout (the same held-out samples in every layout). DataLoader worker w of K
makes the rank's batches k = w, w+K, ... Each worker reads the shards its positions fall in: for the small
held-out sets this serves, that reading is cheap; training streams use the dealt shards of plan.py instead.
Each rank's last batch may be smaller (kept unless drop_last), and ranks may get different numbers of batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from unmask.data.reader import Corrupt, Sample, collate, join, parse_samples, verified_shard
from unmask.data.shards import Manifest, ShardInfo


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
                 start: int, end: int | None, on_corrupt: str, drop_last: bool, retries: int = 3):
        self.m, self.order = manifest, order
        self.b, self.rank, self.world = batch_size, rank, world
        self.start, self.end, self.on_corrupt, self.drop_last = start, end, on_corrupt, drop_last
        self.retries = retries

    def __iter__(self):
        info = get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        return _Worker(self, w, k).batches()


class _Worker:
    def __init__(self, s: _RankStream, w: int, k: int):
        self.s, self.w, self.k = s, w, k
        self.group: _Group | None = None
        self.cache: dict[int, Sample] = {}
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

    def batches(self) -> Iterator[tuple]:
        buf: list[Sample] = []
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
        except Corrupt as e:  # passed as data: a worker's exception would reach the user wrapped in a traceback
            yield torch.empty(0, dtype=torch.long), (), str(e)

    def emit(self, buf: list[Sample]) -> tuple:
        """(tokens [B, L] or, for an SFT split, (tokens, prompt mask), newly skipped shards, error message)"""
        new = tuple(f"{n}\t{r}" for n, r in self.skipped.items() if n not in self.reported)
        self.reported.update(self.skipped)
        return collate(buf), new, ""

    def sample(self, q: int) -> Sample | None:
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

    def read(self, shard: ShardInfo, wanted: dict[int, int]) -> Iterator[tuple[int, Sample]]:
        where = join(self.s.m.path, shard.name)
        try:
            data = verified_shard(where, shard.bytes, shard.sha256, self.s.retries)
        except Corrupt as e:
            if self.s.on_corrupt == "error":
                raise
            self.skipped[shard.name] = str(e)
            return
        m = self.s.m
        for i, arr in enumerate(parse_samples(where, data, shard.samples, m.seq_len, sft=m.sft is not None)):
            if i in wanted:
                yield i, arr
