"""The batches of one rank's loader workers: each worker is one slot and reads only the shards dealt to it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from unmask.data.blend import Blend
from unmask.data.plan import Plan, ShardSequence
from unmask.data.reader import Corrupt, Sample, collate, join, parse_samples, tokens_of, verified_shard


def slot_counts(blend: Blend, *, base: int, batches: int, rank: int, world: int, worker: int, workers: int,
                batch: int) -> np.ndarray:
    """Samples of each source that slot (rank, worker) consumed in the rank's first `batches` batches."""
    counts = np.zeros(blend.k, dtype=np.int64)
    ks = np.arange(worker, batches, workers, dtype=np.int64)
    if blend.k == 1:
        counts[0] = len(ks) * batch
        return counts
    for lo in range(0, len(ks), 1 << 16):
        g = base + ks[lo : lo + (1 << 16), None] * batch * world + rank * batch + np.arange(batch)[None, :]
        counts += blend.counts(g.ravel())
    return counts


class SlotStream(IterableDataset):
    """Yields (batch, newly skipped shards, shard reads, tokens per source, error message); the batch is
    tokens [B, L], or (tokens, prompt mask) for SFT sources (reader.collate)."""

    def __init__(self, sources, seqs: list[ShardSequence], plans: list[Plan], blend: Blend, *, rank: int,
                 world: int, workers: int, batch: int, base: int, start: int, on_corrupt: str, retries: int):
        self.sources, self.seqs, self.plans, self.blend = sources, seqs, plans, blend
        self.rank, self.world, self.workers, self.batch = rank, world, workers, batch
        self.base, self.start, self.on_corrupt, self.retries = base, start, on_corrupt, retries

    def __iter__(self):
        info = get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        assert k == self.workers, (k, self.workers)
        # the DataLoader hands out worker 0's batch first: it must make batch `start`, whose slot is start % K
        return _Slot(self, (self.start + w) % k).batches()


class _Slot:
    def __init__(self, s: SlotStream, w: int):
        self.s, self.w, self.slot = s, w, s.rank * s.workers + w
        self.skipped: dict[str, str] = {}
        self.reported: set[str] = set()
        self.reads: list[tuple[int, int, str, int]] = []

    def batches(self):
        s = self.s
        k = s.start + (self.w - s.start) % s.workers  # this worker's first batch
        counts = slot_counts(s.blend, base=s.base, batches=k, rank=s.rank, world=s.world, worker=self.w,
                             workers=s.workers, batch=s.batch)
        streams = [self.samples(i, int(c)) for i, c in enumerate(counts)]
        try:
            while True:
                g = s.base + k * s.batch * s.world + s.rank * s.batch + np.arange(s.batch)
                rows, tokens = [], np.zeros(len(streams), dtype=np.int64)
                for src in s.blend.sources(g):
                    arr = next(streams[src])
                    rows.append(arr)
                    tokens[src] += int(np.count_nonzero(tokens_of(arr) != s.sources[src].manifest.special.pad))
                new = tuple(f"{n}\t{r}" for n, r in self.skipped.items() if n not in self.reported)
                self.reported.update(self.skipped)
                reads, self.reads = tuple(self.reads), []
                yield collate(rows), new, reads, tuple(tokens.tolist()), ""
                k += s.workers
        except Corrupt as e:  # passed as data: a worker's exception would reach the user wrapped in a traceback
            yield torch.empty(0, dtype=torch.long), (), (), (), str(e)

    def samples(self, src: int, start: int) -> Iterator[Sample]:
        """Source `src`'s samples for this slot from its stream index `start` on, reading each shard once."""
        plan, seq, m = self.s.plans[src], self.s.seqs[src], self.s.sources[src].manifest
        for seg in plan.segments(self.slot, start):
            cache: dict[int, list[Sample] | None] = {}
            for t in range(max(start - seg.start, 0), len(seg.places)):
                place = int(seg.places[t])
                if place not in cache:
                    cache[place] = self.read(src, place // seq.m, m.shards[seq.shard(place)])
                if cache[place] is not None:
                    yield cache[place][int(seg.index[t])]

    def read(self, src: int, epoch: int, shard) -> list[Sample] | None:
        m = self.s.sources[src].manifest
        where = join(m.path, shard.name)
        self.reads.append((src, epoch, shard.name, shard.bytes))
        try:
            data = verified_shard(where, shard.bytes, shard.sha256, self.s.retries)
            return parse_samples(where, data, shard.samples, m.seq_len, sft=m.sft is not None)
        except Corrupt as e:
            if self.s.on_corrupt == "error":
                raise
            self.skipped[shard.name] = str(e)
            return None
