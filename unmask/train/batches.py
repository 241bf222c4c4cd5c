"""Training micro-batches with one reader per tensor-parallel group.

Loaders are keyed by data-parallel rank, so the tensor-parallel peers of a replica would read the very same
shards for the very same batches. With tp > 1 only tensor-parallel rank 0 runs the loader (and its workers); each
micro-batch is broadcast to its peers over the tensor-parallel group. The batch shape is fixed in training
(`ShardLoader(loop=True)` yields full [batch_size, seq_len] batches, straddling epochs), so peers receive into a
preallocated tensor, one collective per micro-batch.

Checkpoints stay per-rank restorable: a peer that does not read counts the batches it received and reports the
position its reader has, so every rank saves the same loader state as before and any of them can resume a
reading rank under another layout (unmask/checkpoint/reshard.py checks that all positions agree).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from unmask.data.loader import ShardLoader
from unmask.parallel.dims import ParallelDims


def collective_device(group) -> torch.device:
    """Where tensors handed to a collective on `group` must live: CUDA under NCCL, else the CPU.
    (The same rule as unmask.parallel.collective's device declaration; use that one once it is there.)"""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tensor_parallel_batches(loader: ShardLoader, dims: ParallelDims):
    """`loader` itself without tensor parallelism; else the reading or receiving view of it for this rank."""
    if dims.tp == 1 or not dist.is_initialized():
        return loader
    return TensorParallelBatches(loader, dims)


class TensorParallelBatches:
    """The loop's view of a ShardLoader when tp > 1: iteration reads (tp rank 0) or receives (its peers); state,
    manifest and counters are the loader's, with the position kept here on the peers that do not read."""

    def __init__(self, loader: ShardLoader, dims: ParallelDims):
        from megatron.core import parallel_state as ps

        if not loader.loop:
            raise ValueError("tensor-parallel batch sharing needs a looping loader (fixed batch shape)")
        self.loader, self.reads = loader, dims.tp_rank == 0
        self.group, self.src = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
        self.device = collective_device(self.group)
        self._position = loader.state_dict()["position"]  # peers' count of the reader's position

    @property
    def manifest(self):
        return self.loader.manifest

    @property
    def skipped_shards(self) -> int:
        return self.loader.skipped_shards

    def __iter__(self) -> Iterator[torch.Tensor]:
        shape = (self.loader.batch_size, self.manifest.seq_len)
        step = self.loader.batch_size * self.loader.world
        if self.reads:
            for tokens in self.loader:
                if tuple(tokens.shape) != shape:
                    raise RuntimeError(f"loader batch {tuple(tokens.shape)} != {shape}: tensor-parallel peers "
                                       "receive fixed-shape batches")
                buf = tokens.to(self.device)
                dist.broadcast(buf, src=self.src, group=self.group)
                yield tokens
        else:
            while True:
                buf = torch.empty(shape, dtype=torch.long, device=self.device)
                dist.broadcast(buf, src=self.src, group=self.group)
                self._position += step
                yield buf.cpu()

    def state_dict(self) -> dict:
        sd = self.loader.state_dict()
        if not self.reads:
            sd.update(position=self._position, epoch=self._position // self.manifest.num_samples)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.loader.load_state_dict(sd)
        self._position = int(sd["position"])
