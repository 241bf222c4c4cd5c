"""Which shards each reader reads: the epochs' shard permutations dealt out to (rank, worker) slots.

Shard sequence. Epoch e permutes the source's M shards with (seed, e); concatenating the epochs gives an
endless sequence where place j holds shard perm_{j // M}[j % M].

Dealing. A plan with S slots (data-parallel ranks x loader workers) starting at place `origin` gives slot s the
places origin + s, origin + s + S, origin + s + 2S, ...: every place, hence every shard of every epoch, goes to
exactly one slot. A slot reads its places `mix` at a time (a group) and emits the group's samples in an order
permuted with (seed, place of the group's first shard): shard-level permutation plus a `mix`-shard shuffle.
Dealing the endless sequence round-robin keeps slots balanced to within one shard for ever (the short last
shard of each epoch rotates among the slots), so ranks stay in the same epoch.

Re-dealing (another layout on resume). The old plan's slots consumed known counts. What they had started and
not finished (the rest of each current group) and the shards dealt to them but not yet reached become the new
plan's handover; the new plan deals from the first place no old slot had reached. The handover, in shard order,
is cut into S' near-equal contiguous pieces, each permuted, and slot s' reads its piece first. No sample is
repeated and none is skipped; shards in the handover may be read by two slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ShardSequence:
    """The endless shard sequence of one source (a pure function of its sample counts, seed and shuffle)."""

    def __init__(self, counts: list[int], seed: int, shuffle: bool):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.m, self.seed, self.shuffle = len(counts), seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def shard(self, j: int) -> int:
        """Manifest index of the shard at place j."""
        e, i = divmod(j, self.m)
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, np.random.default_rng([self.seed, e]).permutation(self.m))
        return int(self._perm[1][i])


@dataclass
class Segment:
    """A run of a slot's stream read together: samples as (place, index within the shard), in order."""

    start: int  # stream index of its first sample
    places: np.ndarray
    index: np.ndarray

    @property
    def end(self) -> int:
        return self.start + len(self.places)


class Plan:
    """Slot streams of one source under one layout (see module docstring)."""

    def __init__(self, seq: ShardSequence, slots: int, mix: int, origin: int = 0,
                 handover: tuple[np.ndarray, np.ndarray] | None = None):
        self.seq, self.slots, self.mix, self.origin = seq, slots, mix, origin
        self.handover = handover if handover is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def piece(self, s: int) -> Segment:
        """Slot s's part of the handover: a contiguous cut, permuted."""
        places, index = self.handover
        cuts = np.linspace(0, len(places), self.slots + 1).astype(np.int64)
        lo, hi = cuts[s], cuts[s + 1]
        perm = np.random.default_rng([self.seq.seed, self.origin, self.slots, s, 3]).permutation(hi - lo)
        return Segment(0, places[lo:hi][perm], index[lo:hi][perm])

    def group(self, s: int, g: int, start: int) -> Segment:
        places = self.origin + s + self.slots * np.arange(g * self.mix, (g + 1) * self.mix, dtype=np.int64)
        counts = [int(self.seq.counts[self.seq.shard(int(j))]) for j in places]
        pl = np.repeat(places, counts)
        ix = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
        if self.seq.shuffle:
            perm = np.random.default_rng([self.seq.seed, int(places[0]), 2]).permutation(len(pl))
            pl, ix = pl[perm], ix[perm]
        return Segment(start, pl, ix)

    def group_size(self, s: int, g: int) -> int:
        places = self.origin + s + self.slots * np.arange(g * self.mix, (g + 1) * self.mix)
        return int(sum(self.seq.counts[self.seq.shard(int(j))] for j in places))

    def locate(self, s: int, c: int) -> tuple[Segment, int]:
        """The segment of slot s holding stream index c, and the number of the group after it."""
        seg = self.piece(s)
        end, g = seg.end, 0
        if end > c:
            return seg, 0
        while end + (size := self.group_size(s, g)) <= c:
            end, g = end + size, g + 1
        return self.group(s, g, end), g + 1

    def segments(self, s: int, from_index: int = 0):
        """Slot s's stream as segments, from the one holding stream index `from_index` on."""
        seg, g = self.locate(s, from_index)
        while True:
            yield seg
            seg, g = self.group(s, g, seg.end), g + 1

    def redeal(self, consumed: list[int], slots: int) -> Plan:
        """The plan under `slots` slots that continues after the old slots consumed these counts."""
        places, index, next_group = [], [], []
        for s, c in enumerate(consumed):
            seg, ng = self.locate(s, c)
            places.append(seg.places[c - seg.start:])
            index.append(seg.index[c - seg.start:])
            next_group.append(ng)
        reach = max(next_group)
        for s, ng in enumerate(next_group):
            for g in range(ng, reach):
                seg = self.group(s, g, 0)
                places.append(seg.places)
                index.append(seg.index)
        pl, ix = np.concatenate(places), np.concatenate(index)
        order = np.lexsort((ix, pl))
        origin = self.origin + self.slots * self.mix * reach
        return Plan(self.seq, slots, self.mix, origin, (pl[order], ix[order]))

    def to_state(self) -> dict:
        """Plain ints only (checkpoints are loaded with weights_only=True)."""
        return {"origin": self.origin, "slots": self.slots, "handover": [self.handover[0].tolist(),
                                                                        self.handover[1].tolist()]}

    @classmethod
    def from_state(cls, seq: ShardSequence, mix: int, sd: dict) -> Plan:
        h = (np.asarray(sd["handover"][0], np.int64), np.asarray(sd["handover"][1], np.int64))
        return cls(seq, int(sd["slots"]), mix, int(sd["origin"]), h)
