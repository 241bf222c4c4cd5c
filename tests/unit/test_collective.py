"""Device discipline of the small collectives: the declared device follows the process group's backend, and no
unmask module hands tensors to torch.distributed except through unmask.parallel.collective."""

import ast
from pathlib import Path

import torch
import torch.distributed as dist

from unmask.parallel import collective
from unmask.parallel.dims import backend

ROOT = Path(__file__).resolve().parents[2] / "unmask"
# torch.distributed functions that take tensors (object collectives and barriers build their own).
TENSOR_COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                      "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
                      "send", "recv", "isend", "irecv", "batch_isend_irecv"}


def test_nccl_declares_the_local_gpu_and_gloo_the_cpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert collective.device_for_backend(backend(gpu=True)) == torch.device("cuda", 3)
    assert collective.device_for_backend("NCCL", local_rank=1) == torch.device("cuda", 1)
    assert collective.device_for_backend(backend(gpu=False)) == torch.device("cpu")
    assert collective.collective_device() == torch.device("cpu")  # no process group: one process


def test_small_collectives_use_the_declared_device(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert collective.collective_device() == torch.device("cpu")
        assert collective.any_rank(True) and not collective.any_rank(False)
        assert collective.all_ranks(True) and not collective.all_ranks(False)
        assert collective.sum_floats([1.0, 2.5]) == [1.0, 2.5]
        t = torch.tensor([4.0])
        assert collective.all_reduce_(t) is t and collective.broadcast_(t, src=0) is t
    finally:
        dist.destroy_process_group()


def test_no_tensor_collective_outside_the_collective_module():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "parallel" / "collective.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in TENSOR_COLLECTIVES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in {"dist", "distributed", "torch_dist", "c10d"}):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.func.value.id}.{node.func.attr}")
    assert not offenders, ("call these through unmask.parallel.collective, which puts tensors on the device "
                           f"of the group's backend: {offenders}")
