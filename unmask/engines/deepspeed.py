"""The DeepSpeed engine: ZeRO 0-3, fp32/bf16, accumulation and clipping, over megatron-core groups.

Order of wrapping (torchtitan's): tensor parallelism -> activation checkpointing -> DeepSpeed (ZeRO).
The DeepSpeed config is generated from unmask's config, never kept by hand; the optimizer is unmask's torch
AdamW (a DeepSpeed "optimizer" section would JIT-compile CPU Adam) and the LR schedule is unmask's.

DeepSpeed's shared-memory all-reduce op: on CPU, DeepSpeed's first `init_distributed` JIT-compiles it
(50-90 s) although it only serves inference all-reduces (AutoTP), never training. It is therefore turned off
here; set UNMASK_DEEPSPEED_SHM=1 to let DeepSpeed build and use it (cached in TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions, so the compile happens once per machine).
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn

from unmask.config import Config
from unmask.engines.base import LocalWeights, StepStats, unpack
from unmask.engines.optim import build_optimizer, build_scheduler
from unmask.parallel import collective
from unmask.parallel.dims import ParallelDims


def deepspeed_config(cfg: Config, dims: ParallelDims) -> dict:
    t, o, p = cfg.train, cfg.optim, cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    # Buckets sized to the model (counting.zero_bucket: one block), not DeepSpeed's 5e8/1e9; at stage 3 the
    # optimizer steps over sub-groups of that size too, so its temporaries are a bucket, not the whole partition,
    # and two blocks stay gathered at most (the next one prefetched). Per-rank peak at DP=2 against one process
    # (bench/memory.py --layouts one,zero3): 1.03x with the defaults, 0.60x with two-block buckets, 0.58x now.
    if p.zero_stage >= 1:
        from unmask.model.counting import zero3_live_params, zero_bucket

        bucket = zero_bucket(cfg.model)
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if p.zero_stage == 3:
            live = zero3_live_params(cfg.model)
            zero.update(stage3_prefetch_bucket_size=live, stage3_max_live_parameters=live,
                        stage3_max_reuse_distance=live, sub_group_size=bucket)
    if p.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    own_clip = p.zero_stage == 0 and t.dtype == "fp32"  # see clip_hook
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dims.dp,
        "gradient_clipping": 0.0 if own_clip else o.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: without it DeepSpeed's bf16 ZeRO applies a step whose gradient is not finite
        # (reporting the norm as -1); DeepSpeed 0.19 defaults it on, older releases off: never leave it implicit.
        "bf16": {"enabled": t.dtype == "bf16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # keep unmask's torch AdamW with offload too
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def prepare_deepspeed() -> None:
    """Import DeepSpeed quietly and keep its shared-memory op from compiling unless asked (module docstring)."""
    import deepspeed
    import deepspeed.ops

    deepspeed.utils.logger.setLevel(logging.WARNING)
    if os.environ.get("UNMASK_DEEPSPEED_SHM", "0") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    alias_zero3_fp32_masters()
    # Adopt the process group setup_parallel made (PipelineModule needs DeepSpeed's comm before initialize).
    deepspeed.init_distributed(dist_init_required=False, verbose=False)


def alias_zero3_fp32_masters() -> None:
    """DeepSpeed 0.19's ZeRO-3 means to use fp32 parameter partitions as their own master weights, but tests
    `tensor.device == self.device` with `self.device` a string ("cpu", "cuda:0"), which is never equal to a
    torch.device: every fp32 run kept a second fp32 copy of its partition (0.71x of one process's peak at DP=2
    instead of 0.55x, bench/memory.py --layouts one,zero3). Its partition builder runs here with a torch.device;
    nothing else reads the attribute during that call."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    build = Stage3._create_fp32_partitions
    if getattr(build, "unmask_device_fix", False):
        return

    def create_fp32_partitions(self):
        saved = self.device
        self.device = torch.device(saved) if isinstance(saved, str) else saved
        try:
            return build(self)
        finally:
            self.device = saved

    create_fp32_partitions.unmask_device_fix = True
    Stage3._create_fp32_partitions = create_fp32_partitions


def global_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm of the full model's gradient: sharded parameters count on every rank, replicated ones on
    tensor-parallel rank 0 only; squares are summed over the tensor x pipeline group."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    sq = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p in params:
        if p.grad is not None and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False)):
            sq += p.grad.detach().float().pow(2).sum()
    collective.all_reduce_(sq, group=ps.get_model_parallel_group())
    return sq.sqrt()


def clip_hook(max_norm: float):
    """An optimizer step pre-hook for ZeRO-0 fp32, where DeepSpeed clips but never records the norm: compute
    the global norm, clip, and on a non-finite norm drop the gradients and flag `overflow` so DeepSpeed
    counts the step as skipped and leaves the LR schedule alone."""

    def hook(optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = global_grad_norm(params)
        optimizer._global_grad_norm = float(norm)
        optimizer.overflow = not math.isfinite(float(norm))
        if optimizer.overflow:
            for p in params:
                p.grad = None
        elif max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)

    return hook


def build_zero3_model(cfg: Config, ds_config: dict, device: torch.device, init_state: dict | None) -> nn.Module:
    """The model built under `deepspeed.zero.Init`: each module is partitioned over the data-parallel ranks as
    soon as it is constructed, then every parameter is gathered alone, filled as in the sharded build
    (unmask.model.build.fill_parameter: same seed, same weights) and partitioned again."""
    import deepspeed

    from unmask.model.build import fill_parameter, new_model
    from unmask.parallel.mpu import MegatronMPU

    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=MegatronMPU(), remote_device=None):
        model = new_model(cfg.model, causal=cfg.causal, block_size=cfg.block_size)
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            fill_parameter(name, p.data, model.init_parameter, cfg.train.seed, init_state)
    return model


def build_model_share(cfg: Config, dims: ParallelDims, device: torch.device, ds_config: dict,
                      init_state: dict | None) -> nn.Module:
    """This rank's share: ZeRO-3 partitions (tp = 1, unmask's Transformer) or the tensor-parallel share."""
    from unmask.engines.build import build_sharded_model

    if cfg.parallel.zero_stage == 3 and dims.tp == 1:
        return build_zero3_model(cfg, ds_config, device, init_state)
    return build_sharded_model(cfg, dims, device, init_state)


def prepare_model(cfg: Config, model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Tensor parallelism (a no-op on a model built sharded), LoRA adapters (lora.rank > 0; config refuses them
    with tp > 1), then activation checkpointing of every block (torchtitan's order). The objective was given the
    vocab-parallel loss when it was built (engines.build)."""
    from unmask.engines.build import with_lora

    if dims.tp > 1:
        from unmask.parallel.tensor import TP_PLAN, apply_tensor_parallel

        apply_tensor_parallel(model, TP_PLAN)
    model = with_lora(model, cfg)
    if cfg.parallel.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        from unmask.core.bert_blocks import BertBlock
        from unmask.core.transformer import Block

        # Non-reentrant torch checkpointing; its wrapper strips its prefix from state-dict keys.
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, (Block, BertBlock)))
    return model


def initialize(cfg: Config, module: nn.Module, ds_config: dict, **kwargs):
    """What both DeepSpeed engines do to start: unmask's AdamW (+ the ZeRO-0 fp32 clip hook) and LR schedule,
    then `deepspeed.initialize`. Returns (DeepSpeed engine, its optimizer, the scheduler)."""
    import deepspeed

    optimizer = build_optimizer(module, cfg.optim)
    if cfg.parallel.zero_stage == 0 and cfg.train.dtype == "fp32":
        optimizer.register_step_pre_hook(clip_hook(cfg.optim.grad_clip))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    ds, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                  config=ds_config, **kwargs)
    return ds, ds_optimizer, scheduler


def all_reduce_dp(values: list[float]) -> list[float]:
    """Sum scalars over the data-parallel group (fp64 so token counts stay exact)."""
    from megatron.core import parallel_state as ps

    return collective.sum_floats(values, group=ps.get_data_parallel_group())


def step_stats(ds, loss: float, lr: float) -> StepStats:
    """A step counts as skipped unless DeepSpeed applied it with a finite loss and a finite, non-negative norm
    (DeepSpeed's norm helpers report inf/NaN as -1)."""
    norm = ds.get_global_grad_norm()
    norm = float("nan") if norm is None else float(norm)
    finite = math.isfinite(loss) and math.isfinite(norm) and norm >= 0
    return StepStats(loss, norm, lr, skipped=not (ds.was_step_applied() and finite))


def zero3_sync(ds) -> None:
    """After a ZeRO-3 partition (`p.ds_tensor`) was written outside the optimizer: drop every gathered copy, so the
    next forward gathers the new values, then gather the persistent parameters again. Persistent ones (numel under
    `stage3_param_persistence_threshold`) stay gathered between steps and are refreshed from their partitions only
    after an optimizer step; writing `ds_tensor` alone would leave their old `p.data` in use. This is what the
    ZeRO-3 optimizer itself does around a step (`_partition_all_parameters`, then `_post_step`)."""
    optimizer = ds.optimizer
    optimizer.parameter_offload.partition_all_parameters()
    persistent = optimizer.persistent_parameters
    if persistent:
        persistent[0].all_gather(persistent)


def ds_local_weights(ds, pp_stage: int = 0) -> LocalWeights:
    """A DeepSpeed module's live weights on this rank. ZeRO 0-2 keep each rank's whole (tensor-parallel shard of
    the) parameter, identical over the data-parallel ranks, so an average of it is replicated there too; ZeRO-3
    keeps only this rank's flat partition of each parameter."""
    from megatron.core import parallel_state as ps

    where = {"tp_rank": ps.get_tensor_model_parallel_rank(), "pp_stage": pp_stage,
             "dp_rank": ps.get_data_parallel_rank(), "dp": ps.get_data_parallel_world_size()}
    params = [(n, p) for n, p in ds.module.named_parameters() if p.requires_grad]  # LoRA: the adapters only
    if ds.zero_optimization_stage() == 3:
        return LocalWeights({n: p.ds_tensor.data for n, p in params}, kind="zero3",
                            shapes={n: list(p.ds_shape) for n, p in params}, sync=lambda: zero3_sync(ds), **where)
    return LocalWeights({n: p.data for n, p in params}, **where)


class DeepSpeedCheckpointing:
    """What both DeepSpeed engines share: the data-parallel reduction, per-rank checkpoint files (model shards,
    ZeRO partitions, LR schedule) written by DeepSpeed itself, and the live weights."""

    ds = None

    def local_weights(self) -> LocalWeights:
        return ds_local_weights(self.ds)

    def all_reduce_dp(self, values: list[float]) -> list[float]:
        return all_reduce_dp(values)

    def save(self, directory: str, tag: str) -> None:
        self.ds.save_checkpoint(directory, tag=tag)

    def load(self, directory: str, tag: str) -> None:
        self.ds.load_checkpoint(directory, tag=tag)


class DeepSpeedEngine(DeepSpeedCheckpointing):
    """The LocalEngine interface on a DeepSpeed engine (`.ds`), without pipeline stages."""

    def __init__(self, cfg: Config, model: nn.Module | None, objective, dims: ParallelDims,
                 device: torch.device | None = None, init_state: dict | None = None):
        """`model`: a whole plain model to lay out, or None to build only this rank's share on `device`."""
        from unmask.parallel.mpu import MegatronMPU

        prepare_deepspeed()
        self.cfg, self.objective, self.dims = cfg, objective, dims
        ds_config = deepspeed_config(cfg, dims)
        if model is None:
            model = build_model_share(cfg, dims, device or torch.device("cpu"), ds_config, init_state)
        model = prepare_model(cfg, model, dims)
        self.ds, self.optimizer, self.scheduler = initialize(cfg, model, ds_config,
                                                             mpu=MegatronMPU(), dist_init_required=False)
        self.model = self.ds.module
        self.device = self.ds.device

    def train_step(self, micro_batches, keys) -> StepStats:
        self.ds.train()
        lr = self.scheduler.get_last_lr()[0]
        total = 0.0
        for batch, key in zip(micro_batches, keys, strict=True):
            x0, extra = unpack(batch, self.device)
            out = self.objective.loss(self.ds, x0, key, **extra)
            self.ds.backward(out.loss)  # DeepSpeed divides by grad_accum (scale_wrt_gas)
            self.ds.step()  # applies the update only at the accumulation boundary
            total += float(out.loss.detach())
        loss = all_reduce_dp([total / len(micro_batches)])[0] / self.dims.dp
        return self._stats(loss, lr)

    def _stats(self, loss: float, lr: float) -> StepStats:
        return step_stats(self.ds, loss, lr)

    @torch.no_grad()
    def eval_terms(self, x0, time_samples, key):
        self.ds.eval()
        x0, extra = unpack(x0, self.device)
        return self.objective.eval_terms(self.ds, x0, time_samples, key, **extra)
