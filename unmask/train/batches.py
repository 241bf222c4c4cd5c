"""Training micro-batches with one reader per tensor-parallel group.

Loaders are keyed by data-parallel rank, so the tensor-parallel peers of a replica would read the very same
shards for the very same batches. With tp > 1 only tensor-parallel rank 0 runs the loader (and its workers); each
micro-batch is broadcast to its peers over the tensor-parallel group. The batch shape is fixed in training
(`ShardLoader(loop=True)` yields full [batch_size, seq_len] batches, straddling epochs), so peers receive into a
preallocated tensor, one collective per micro-batch (two on an SFT split: the tokens, then the prompt mask).

Checkpoints stay per-rank restorable: at a save, a peer that does not read receives its reader's whole loader state
(position and per-worker shard deals), so every rank saves the same loader state as before and any of them can
resume a reading rank under another layout (unmask/checkpoint/reshard.py checks that all positions agree).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from unmask.data.loader import ShardLoader
from unmask.parallel import collective
from unmask.parallel.dims import ParallelDims


def tensor_parallel_batches(loader: ShardLoader, dims: ParallelDims):
    """`loader` itself without tensor parallelism; else the reading or receiving view of it for this rank."""
    if dims.tp == 1 or not dist.is_initialized():
        return loader
    return TensorParallelBatches(loader, dims)


class TensorParallelBatches:
    """The loop's view of a ShardLoader when tp > 1: iteration reads (tp rank 0) or receives (its peers); state,
    manifest and counters are the reader's."""

    def __init__(self, loader: ShardLoader, dims: ParallelDims):
        from megatron.core import parallel_state as ps

        if not loader.loop:
            raise ValueError("tensor-parallel batch sharing needs a looping loader (fixed batch shape)")
        self.loader, self.reads = loader, dims.tp_rank == 0
        self.group, self.src = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
        self.device = collective.collective_device(self.group)

    @property
    def manifest(self):
        return self.loader.manifest

    @property
    def skipped_shards(self) -> int:
        return self.loader.skipped_shards

    def log_fields(self) -> dict:
        return self.loader.log_fields()  # logged by global rank 0, a reader

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        shape = (self.loader.batch_size, self.manifest.seq_len)
        sft = self.manifest.sft is not None  # batches are (tokens, prompt_mask)
        if self.reads:
            for batch in self.loader:
                tokens = batch[0] if sft else batch
                if tuple(tokens.shape) != shape:
                    raise RuntimeError(f"loader batch {tuple(tokens.shape)} != {shape}: tensor-parallel peers "
                                       "receive fixed-shape batches")
                collective.broadcast_(tokens, src=self.src, group=self.group)
                if sft:  # as uint8: not every backend broadcasts bool tensors
                    collective.broadcast_(batch[1].to(torch.uint8), src=self.src, group=self.group)
                yield batch
        else:
            while True:
                tokens = collective.broadcast_(torch.empty(shape, dtype=torch.long), src=self.src, group=self.group)
                if not sft:
                    yield tokens
                    continue
                mask = collective.broadcast_(torch.empty(shape, dtype=torch.uint8), src=self.src, group=self.group)
                yield tokens, mask.bool()

    def state_dict(self) -> dict:
        """The reader's state on every rank of the group (every rank calls this when a checkpoint is saved)."""
        return collective.broadcast_object(self.loader.state_dict() if self.reads else None, src=self.src,
                                           group=self.group)

    def load_state_dict(self, sd: dict) -> None:
        self.loader.load_state_dict(sd)
