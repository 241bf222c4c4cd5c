"""Model + objective + engine, built in one place for the loop, the tests and the benchmarks.

Order: plain model (optionally loaded) -> objective, given the loss that fits the layout (vocab-parallel under
tensor parallelism) -> an optional stage wrapper around it (distillation's teacher) -> the engine, which applies
the parallel layout to the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from unmask.config import Config
from unmask.data.special import SpecialTokens
from unmask.diffusion.objective import build_objective
from unmask.engines.base import Engine
from unmask.model.build import build_model
from unmask.parallel.dims import ParallelDims


@dataclass
class Components:
    model: nn.Module  # the engine's module (after tensor parallelism / pipeline wrapping)
    objective: object  # the objective the engine steps (a stage's wrapper if one was given)
    engine: Engine


def build_engine(cfg: Config, model: nn.Module, objective, dims: ParallelDims) -> Engine:
    """The engine of `parallel.engine`: local, DeepSpeed ZeRO, or DeepSpeed pipeline stages when pp > 1."""
    if cfg.parallel.engine == "local":
        from unmask.engines.local import LocalEngine

        return LocalEngine(model, objective, cfg)
    if dims.pp > 1:
        from unmask.engines.pipeline import PipelineEngine

        return PipelineEngine(cfg, model, objective, dims)
    from unmask.engines.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(cfg, model, objective, dims)


def build_components(cfg: Config, dims: ParallelDims, device: torch.device, special: SpecialTokens,
                     init_state: dict | None = None,
                     wrap_objective: Callable[[object, nn.Module], object] | None = None) -> Components:
    """Build what a stage trains. The caller has set up the process groups (`setup_parallel`) and seeded torch.

    `init_state`: full plain weights to start from; `wrap_objective(objective, model)`: a stage's objective around
    the base one, given the plain model before any parallel layout (distillation copies it as the teacher)."""
    model = build_model(cfg.model, causal=cfg.causal, device=device)
    if init_state is not None:
        model.load_state_dict(init_state)
    nll = None
    if dims.tp > 1:
        from unmask.parallel.tensor import vocab_parallel_nll

        nll = vocab_parallel_nll
    objective = build_objective(cfg.diffusion, special.mask, special.pad, cfg.train.seed,
                                cfg.model.time_conditioning, nll=nll)
    if wrap_objective is not None:
        objective = wrap_objective(objective, model)
    engine = build_engine(cfg, model, objective, dims)
    return Components(engine.model, objective, engine)
