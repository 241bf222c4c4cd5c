"""Model + objective + engine, built in one place for the loop, the tests and the benchmarks.

Order: objective, given the loss that fits the layout (vocab-parallel under tensor parallelism) -> the engine,
which builds its own share of the model (construction is sharded: meta build -> parallelize -> per-parameter
init, see unmask.model.build.materialize) -> an optional stage wrapper around the objective. A stage wrapper that
needs the whole plain model (distillation's teacher) makes the engine start from a whole model instead."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from unmask.config import Config
from unmask.data.special import SpecialTokens
from unmask.diffusion.objective import build_objective
from unmask.engines.base import Engine
from unmask.model.build import build_model, materialize
from unmask.parallel.dims import ParallelDims


@dataclass
class Components:
    model: nn.Module  # the engine's module (after tensor parallelism / pipeline wrapping)
    objective: object  # the objective the engine steps (a stage's wrapper if one was given)
    engine: Engine


def build_sharded_model(cfg: Config, dims: ParallelDims, device: torch.device,
                        init_state: Mapping | None = None) -> nn.Module:
    """This rank's tensor-parallel share of the model (the whole model at tp=1), built on the meta device and
    filled parameter by parameter from (cfg.train.seed, name) or from `init_state`'s full weights, sliced."""
    model = build_model(cfg.model, causal=cfg.causal, block_size=cfg.block_size, device="meta")
    if dims.tp > 1:
        from unmask.parallel.tensor import TP_PLAN, apply_tensor_parallel

        apply_tensor_parallel(model, TP_PLAN, gpu=device.type == "cuda")
    return materialize(model, device, model.init_parameter, cfg.train.seed, source=init_state)


def whole_model(cfg: Config, device: torch.device, init_state: Mapping | None = None) -> nn.Module:
    """The whole plain model with the same weights as the sharded build (for stages that need all of it)."""
    return build_sharded_model(cfg, ParallelDims(), device, init_state)


def with_lora(model: nn.Module, cfg: Config) -> nn.Module:
    """The model with LoRA adapters injected when lora.rank > 0 (after its weights are in place), else as it is."""
    if not cfg.lora.rank:
        return model
    from unmask.model.lora import add_lora

    return add_lora(model, cfg)


def build_engine(cfg: Config, model: nn.Module | None, objective, dims: ParallelDims, device: torch.device,
                 init_state: Mapping | None = None) -> Engine:
    """The engine of `parallel.engine`: local, DeepSpeed ZeRO, or DeepSpeed pipeline stages when pp > 1. With
    `model` None each engine builds only its rank's share (`init_state`: full weights to slice from)."""
    if cfg.parallel.engine == "local":
        from unmask.engines.local import LocalEngine

        return LocalEngine(with_lora(model or build_sharded_model(cfg, dims, device, init_state), cfg), objective,
                           cfg)
    if dims.pp > 1:
        from unmask.engines.pipeline import PipelineEngine

        return PipelineEngine(cfg, model, objective, dims, device, init_state)
    from unmask.engines.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(cfg, model, objective, dims, device, init_state)


def build_components(cfg: Config, dims: ParallelDims, device: torch.device, special: SpecialTokens,
                     init_state: Mapping | None = None,
                     wrap_objective: Callable[[object, nn.Module], object] | None = None) -> Components:
    """Build what a stage trains. The caller has set up the process groups (`setup_parallel`).

    `init_state`: full plain weights to start from (sliced per parameter into this rank's share);
    `wrap_objective(objective, model)`: a stage's objective around the base one, given the whole plain model
    before any parallel layout (distillation copies it as the teacher), which then goes to the engine."""
    nll = stats = None
    if dims.tp > 1:
        from unmask.parallel.tensor import vocab_parallel_nll, vocab_parallel_stats

        nll, stats = vocab_parallel_nll, vocab_parallel_stats
    objective = build_objective(cfg.diffusion, special.mask, special.pad, cfg.train.seed,
                                cfg.model.time_conditioning, nll=nll, eos_id=special.eos,
                                vocab_size=cfg.model.vocab_size, vocab_stats=stats)
    model = None
    if wrap_objective is not None:
        model = whole_model(cfg, device, init_state)
        objective = wrap_objective(objective, model)
    engine = build_engine(cfg, model, objective, dims, device, init_state)
    return Components(engine.model, objective, engine)
