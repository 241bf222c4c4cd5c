"""Streaming, exactly resumable reader of prepare-data shards for one data-parallel rank.

Reading (training, loop=True). The (rank, worker) pairs are S = dp_world x max(num_workers, 1) slots. Every epoch's
shards are permuted and dealt out to the slots (plan.py): each shard is read by exactly one slot per epoch, once,
so a job reads the dataset about once per epoch whatever its size (bound: each shard once per epoch, plus, after a
resume, the current group of `mix_shards` shards of each slot read again, and after a layout change the handover
shards read by up to two slots). Shuffling: shard permutation per epoch, then the samples of each slot's `mix_shards`
consecutive shards permuted together. Memory: `mix_shards` shards per worker and source.

Batches. Rank r's k-th batch comes from worker k % K's slot, so the DataLoader's in-order hand-out gives a stream
that depends on the layout (ranks, workers, batch size) only. Mixtures: global position g = base + k*B*W + r*B + j
draws from the source blend.py names for g, and the slot takes the next sample of its stream of that source.

State and guarantee. The state is the batches each rank consumed since `base` (equal on all ranks in synchronous
data parallelism), the layout, and each source's plan; `position` = base + batches*B*W is the same on every
rank. Same layout: the resumed batches equal the uninterrupted run's. Another layout (data-parallel size, workers
or batch size): each source's plan is re-dealt from what every old slot consumed, so within the epoch no sample is
seen twice and none is skipped; the batches themselves differ from any uninterrupted run.

Integrity: a shard is hashed while it streams in and checked against the manifest's size and sha256 before any of
its samples is used (reader.py). on_corrupt="error" stops with a DataError naming the shard; "skip" warns, counts
the shard in `.skipped_shards` and draws the next samples instead (a resume after a skip may then repeat samples).

loop=False (validation, evaluation): one pass partitioned by global position, the same in every layout (passes.py).

SFT splits (manifest `sft` set, prepare-data --format chat): each batch is the tuple (tokens [B, L] int64, prompt_mask
[B, L] bool), True on <bos> and the prompt, False on the response and its <eos> padding. Order, state and resume are
the same as for tokens alone; a mixture may not combine SFT and pretraining splits.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from unmask.data.blend import Blend
from unmask.data.passes import _Order, _RankStream
from unmask.data.plan import Plan, ShardSequence
from unmask.data.shards import Manifest, read_manifest
from unmask.data.sources import load_sources
from unmask.data.stream import SlotStream, slot_counts
from unmask.errors import DataError

__all__ = ["Manifest", "ShardLoader", "read_manifest", "CorruptShardWarning"]


class CorruptShardWarning(UserWarning):
    """A shard failed its integrity check and was skipped (on_corrupt="skip")."""


class ShardLoader:
    """Batches `torch.LongTensor [batch_size, seq_len]` of one data-parallel rank, or for an SFT split the
    tuple (tokens, prompt_mask bool [batch_size, seq_len]) (see module docstring).

    `split_dir` is a directory or URL; `sources` [(location, weight), ...] replaces it with a weighted mixture."""

    def __init__(self, split_dir: str | Path | None, batch_size: int, *, seq_len: int, model_vocab_size: int,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, num_workers: int = 0, loop: bool = True,
                 shuffle: bool = True, on_corrupt: str = "error", drop_last: bool = False, mix_shards: int = 8,
                 tokenizer_path: str | Path | None = None, sources: list[tuple[str, float]] | None = None,
                 retries: int = 3):
        if not (batch_size > 0 and 0 <= dp_rank < dp_world and num_workers >= 0 and mix_shards > 0 and retries >= 0):
            raise ValueError(f"bad loader layout: batch_size={batch_size} dp_rank={dp_rank} dp_world={dp_world} "
                             f"num_workers={num_workers} mix_shards={mix_shards} retries={retries}")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt={on_corrupt!r}; allowed: error, skip")
        spec = list(sources) if sources else [(str(split_dir), 1.0)]
        if not loop and len(spec) > 1:
            raise ValueError("a single pass (loop=False) reads one split, not a mixture")
        self.sources = load_sources(spec, seq_len=seq_len, model_vocab_size=model_vocab_size,
                                    tokenizer_path=tokenizer_path, retries=retries)
        self.manifest = self.sources[0].manifest
        self.batch_size, self.rank, self.world, self.seed = batch_size, dp_rank, dp_world, seed
        self.num_workers, self.loop, self.shuffle, self.on_corrupt = num_workers, loop, shuffle, on_corrupt
        self.drop_last, self.mix_shards, self.retries = drop_last, mix_shards, retries
        self.slots = dp_world * max(num_workers, 1)
        self._seqs = [ShardSequence([s.samples for s in src.manifest.shards], seed, shuffle) for src in self.sources]
        self._plans = [Plan(seq, self.slots, mix_shards) for seq in self._seqs]
        self._blend = Blend([s.weight for s in self.sources], seed)
        self._base = 0  # global position where the current plans took over
        self._n = 0  # batches this rank consumed since _base (loop=True) / position within the pass (loop=False)
        self._resume: int | None = None  # loop=False: a loaded position, used by the next iter() only
        self._skipped: dict[str, str] = {}
        self.rank_source_tokens: dict[str, int] = {s.name: 0 for s in self.sources}  # non-padding, this rank
        self._source_samples = np.zeros(len(self.sources), dtype=np.int64)  # all ranks, from the blend
        self.shard_reads: Counter = Counter()  # (source, epoch, shard) -> reads by this rank's workers
        self.bytes_read = 0

    @property
    def num_samples(self) -> int:
        return sum(s.manifest.num_samples for s in self.sources)

    @property
    def position(self) -> int:
        """Samples consumed by all ranks together (the same on every rank)."""
        return self._base + self._n * self.batch_size * self.world if self.loop else self._n

    @property
    def source_tokens(self) -> dict[str, int]:
        """Tokens (samples x seq_len) drawn from each source by all ranks together: the mixture as trained.
        Exact and the same on every rank (the blend is a function of the global position); for metrics.jsonl."""
        return {s.name: int(c) * s.manifest.seq_len for s, c in zip(self.sources, self._source_samples, strict=True)}

    def log_fields(self) -> dict[str, int]:
        """`tokens_<source>` per source of a mixture, for the metrics row (none for a single source)."""
        if len(self.sources) == 1:
            return {}
        return {f"tokens_{s.label}": n for s, n in zip(self.sources, self.source_tokens.values(), strict=True)}

    @property
    def skipped_shards(self) -> int:
        """How many distinct shards were skipped as corrupted (on_corrupt="skip")."""
        return len(self._skipped)

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        if not self.loop:
            yield from self._single_pass()
            return
        stream = SlotStream(self.sources, self._seqs, self._plans, self._blend, rank=self.rank, world=self.world,
                            workers=max(self.num_workers, 1), batch=self.batch_size, base=self._base,
                            start=self._n, on_corrupt=self.on_corrupt, retries=self.retries)
        for tokens, skipped, reads, src_tokens, error in self._run(stream):
            self._account(error, skipped)
            for src, epoch, shard, size in reads:
                self.shard_reads[(self.sources[src].name, epoch, shard)] += 1
                self.bytes_read += size
            for src, n in enumerate(src_tokens):
                self.rank_source_tokens[self.sources[src].name] += int(n)
            step = self.batch_size * self.world
            self._source_samples += self._blend.counts(np.arange(self.position, self.position + step))
            self._n += 1
            yield tokens

    def _run(self, stream):
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers))

    def _account(self, error: str, skipped: tuple[str, ...]) -> None:
        if error:
            raise DataError(error)
        for item in skipped:
            name, reason = item.split("\t", 1)
            if name not in self._skipped:
                self._skipped[name] = reason
                warnings.warn(f"skipping {reason}", CorruptShardWarning, stacklevel=3)

    def _single_pass(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        m, n_all = self.manifest, self.manifest.num_samples
        start, self._resume = (self._resume or 0), None
        order = _Order([s.samples for s in m.shards], self.seed, self.shuffle, self.mix_shards)
        stream = _RankStream(m, order, batch_size=self.batch_size, rank=self.rank, world=self.world, start=start,
                             end=n_all, on_corrupt=self.on_corrupt, drop_last=self.drop_last, retries=self.retries)
        self._n = start
        step = self.batch_size * self.world
        for n, (tokens, skipped, error) in enumerate(self._run(stream), 1):
            self._account(error, skipped)
            self._n = min(start + n * step, n_all)
            yield tokens

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "num_samples": self.num_samples,
                "seed": self.seed, "shuffle": self.shuffle, "mix_shards": self.mix_shards,
                "sources": [[s.name, s.weight, s.manifest.num_samples] for s in self.sources],
                "dp_world": self.world, "batch_size": self.batch_size, "workers": max(self.num_workers, 1),
                "base": self._base, "batches": self._n, "plans": [p.to_state() for p in self._plans],
                "source_samples": self._source_samples.tolist(), "rank_source_tokens": dict(self.rank_source_tokens),
                "skipped_shards": sorted(self._skipped)}

    def load_state_dict(self, sd: dict) -> None:
        mine = self.state_dict()
        for key in ("num_samples", "seed", "shuffle", "mix_shards"):  # these define the order itself
            if sd.get(key) != mine[key]:
                raise DataError(f"loader state has {key}={sd.get(key)!r} but this loader has {mine[key]!r} "
                                f"({self.manifest.path}); the saved position would not name the same samples")
        if self.loop and "plans" not in sd:
            raise DataError(f"loader state at position {sd.get('position')} comes from an unmask before the dealt "
                            "shard reading; resume it with that version, or start the data stream afresh")
        for name in sd.get("skipped_shards", []):
            self._skipped.setdefault(name, "skipped before the resume")
        if not self.loop:
            self._n = self._resume = int(sd["position"])
            return
        if [s[:2] for s in sd["sources"]] != [[s.name, s.weight] for s in self.sources]:
            raise DataError(f"loader state has sources {sd['sources']} but this run reads "
                            f"{mine['sources']}; a mixture cannot change in the middle of a run")
        self.rank_source_tokens.update(sd.get("rank_source_tokens", {}))
        self._source_samples = np.asarray(sd.get("source_samples", self._source_samples), dtype=np.int64)
        plans = [Plan.from_state(seq, self.mix_shards, p) for seq, p in zip(self._seqs, sd["plans"], strict=True)]
        old = (int(sd["dp_world"]), int(sd["workers"]), int(sd["batch_size"]))
        if old == (self.world, max(self.num_workers, 1), self.batch_size):
            self._plans, self._base, self._n = plans, int(sd["base"]), int(sd["batches"])
            return
        world, workers, batch = old
        consumed = [[] for _ in self.sources]  # per source: what each old slot consumed
        for r in range(world):
            for w in range(workers):
                counts = slot_counts(self._blend, base=int(sd["base"]), batches=int(sd["batches"]), rank=r,
                                     world=world, worker=w, workers=workers, batch=batch)
                for src, c in enumerate(counts):
                    consumed[src].append(int(c))
        self._plans = [p.redeal(c, self.slots) for p, c in zip(plans, consumed, strict=True)]
        self._base, self._n = int(sd["position"]), 0
