"""The small collectives (flags, counters, objects) of the loop, the engines and the checkpointer; no-ops in one
process. This is the one module that builds tensors for `torch.distributed`: each lives on the device the process
group's backend needs (`collective_device`), since NCCL accepts only CUDA tensors and gloo only CPU ones.
tests/unit/test_collective.py checks that no other unmask module calls a tensor collective itself."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def device_for_backend(backend: str, local_rank: int | None = None) -> torch.device:
    """nccl -> cuda:LOCAL_RANK (the GPU setup_parallel selected); gloo, mpi and one process -> cpu."""
    if str(backend).lower() == "nccl":
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """Where tensors handed to a collective on `group` (default: the world) must live."""
    if not active():
        return torch.device("cpu")
    return device_for_backend(dist.get_backend(group))


def barrier() -> None:
    if active():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any rank."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks(flag: bool) -> bool:
    """True on every rank only if it is true on every rank."""
    return not any_rank(not flag)


def sum_floats(values: list[float], group=None) -> list[float]:
    """Sum scalars over `group` (fp64, so token counts stay exact); the values themselves in one process."""
    if not active() or dist.get_world_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, group=group)
    return t.cpu().tolist()


def all_reduce_(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a tensor made elsewhere (a gradient norm), moved to the group's device and back."""
    if not active():
        return t
    dev = collective_device(group)
    work = t if t.device == dev else t.to(dev)
    dist.all_reduce(work, op=op, group=group)
    if work is not t:
        t.copy_(work)
    return t


def broadcast_(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank `src` over `group`, on the group's device."""
    if not active():
        return t
    dev = collective_device(group)
    work = t if t.device == dev else t.to(dev)
    dist.broadcast(work, src=src, group=group)
    if work is not t:
        t.copy_(work)
    return t


def broadcast_object(obj, src: int = 0, group=None):
    """`obj` of global rank `src` on every rank of `group`."""
    # torch's object collectives place their byte tensors on the current CUDA device under NCCL themselves
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
