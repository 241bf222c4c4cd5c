"""Parallel degrees: dp * tp * pp == world size, validated before any process group is made.

Rank layout follows megatron-core's default order (tp fastest, then dp, then pp), which is also DeepSpeed's
`PipeModelDataParallelTopology` layout (axes pipe, data, model), so both libraries agree on every group:
    rank = tp_rank + tp * (dp_rank + dp * pp_rank)
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from unmask.config import Config
from unmask.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data shard: tp and pp peers of one data-parallel replica share it."""
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only rank that logs and writes run files."""
        return self.rank == 0


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torchrun or the SLURM launcher; one process otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def validate_layout(cfg: Config, world: int, gpu: bool | None = None) -> ParallelDims:
    """Check the layout against the world size and the model shape; raise one ConfigError line naming the fix.
    (`gpu` is accepted for callers that pass it; no layout option depends on the device any more.)"""
    p, m = cfg.parallel, cfg.model
    if world % (p.tp * p.pp):
        raise ConfigError(f"world size {world} is not divisible by parallel.tp * parallel.pp = {p.tp} * {p.pp}; "
                          f"launch a multiple of {p.tp * p.pp} processes or change parallel.tp/parallel.pp")
    checks = [
        (m.n_heads % p.tp, f"model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}"),
        (m.kv_heads % p.tp, f"model.n_kv_heads={m.kv_heads} is not divisible by parallel.tp={p.tp}"),
        (m.ffn_dim % p.tp, f"model.ffn_dim={m.ffn_dim} is not divisible by parallel.tp={p.tp}"),
        (m.vocab_size % p.tp, f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}; "
                              "pad the vocabulary to a multiple of tp"),
        (m.n_layers % p.pp, f"model.n_layers={m.n_layers} is not divisible by parallel.pp={p.pp}"),
    ]
    for bad, msg in checks:
        if bad:
            raise ConfigError(f"{msg}; choose a tensor/pipeline degree that divides it")
    if p.engine == "local":
        for key, value, ok in [("world size", world, 1), ("parallel.tp", p.tp, 1), ("parallel.pp", p.pp, 1),
                               ("parallel.zero_stage", p.zero_stage, 0)]:
            if value != ok:
                raise ConfigError(f"{key}={value} needs parallel.engine=\"deepspeed\" "
                                  "(the local engine runs one plain process)")
        if p.cpu_offload:
            raise ConfigError("parallel.cpu_offload=true needs parallel.engine=\"deepspeed\" and zero_stage >= 1")
    if p.cpu_offload and p.zero_stage == 0:
        raise ConfigError("parallel.cpu_offload=true needs parallel.zero_stage >= 1 (ZeRO offloads its partitions)")
    if p.pp > 1:
        if p.zero_stage > 1:
            raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: DeepSpeed pipelines "
                              "support ZeRO 0 or 1; set zero_stage <= 1")
        if cfg.train.dtype == "bf16" and p.zero_stage == 0:
            raise ConfigError("train.dtype=bf16 with parallel.pp > 1 needs parallel.zero_stage=1 "
                              "(DeepSpeed stage-0 bf16 pipeline checkpoints fail to load)")
        if m.tie_embeddings:
            raise ConfigError("model.tie_embeddings=true with parallel.pp > 1 is not supported; untie the "
                              "embeddings or use pp=1")
    return ParallelDims(dp=world // (p.tp * p.pp), tp=p.tp, pp=p.pp)


def setup_parallel(cfg: Config) -> ParallelDims:
    """The single entry point of the train loop: validate, then init torch.distributed and megatron's groups.

    Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (torchrun or the SLURM launcher set them).
    The DeepSpeed engine always gets a process group, even in one process, so DeepSpeed never goes looking
    for MPI; the local engine in one process needs none."""
    rank, world, local_rank = world_from_env()
    layout = validate_layout(cfg, world)
    dims = ParallelDims(dp=layout.dp, tp=layout.tp, pp=layout.pp, rank=rank, local_rank=local_rank)
    for key, value in cfg.launch.env_vars.items():
        os.environ.setdefault(key, value)  # CUDA's allocator reads these at its first allocation, NCCL at its start
    if cfg.parallel.engine == "local":
        return dims
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(key, value)
        timeout = timedelta(minutes=cfg.launch.collective_timeout_minutes)
        torch.distributed.init_process_group(backend(gpu), rank=rank, world_size=world, timeout=timeout)
    init_model_parallel(dims, cfg.train.seed, gpu)
    return dims


def teardown_parallel() -> None:
    """End a run's process groups cleanly: every rank waits at a barrier, then megatron's groups and the
    default group are destroyed. A rank that left with its gloo/NCCL group still alive can abort at interpreter
    exit ("terminate called without an active exception") while a peer is still finishing."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        return
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def backend(gpu: bool) -> str:
    """The process-group backend; unmask.parallel.collective.collective_device maps it to a tensor device."""
    return "nccl" if gpu else "gloo"


def init_model_parallel(dims: ParallelDims, seed: int, gpu: bool) -> None:
    """megatron-core's tp/pp/dp groups and its RNG streams (a CPU tracker when there is no GPU)."""
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        # On CPU every group is gloo already: skip megatron's duplicate gloo groups.
        parallel_state.initialize_model_parallel(dims.tp, dims.pp, create_gloo_process_groups=gpu)
    got = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
           parallel_state.get_pipeline_model_parallel_rank())
    if got != (dims.tp_rank, dims.dp_rank, dims.pp_rank):
        raise RuntimeError(f"megatron placed rank {dims.rank} at (tp, dp, pp)={got}, "
                           f"expected {(dims.tp_rank, dims.dp_rank, dims.pp_rank)}")
    if gpu:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from unmask.parallel.rng import install_cpu_rng_tracker

        install_cpu_rng_tracker(seed, dims.tp_rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
