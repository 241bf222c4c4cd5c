"""TEMPORARY shim until the engines package lands (helper B)."""
from dataclasses import dataclass

from unmask.train.engine import Engine, build_engine  # noqa: F401


@dataclass
class Components:
    model: object
    objective: object
    engine: object


def build_components(cfg, dims, device, special, init_state=None, wrap_objective=None):
    from unmask.diffusion.objective import build_objective
    from unmask.model.build import build_model

    model = build_model(cfg.model, causal=cfg.causal, device=device)
    if init_state is not None:
        model.load_state_dict(init_state)
    objective = build_objective(cfg.diffusion, special.mask, special.pad, cfg.train.seed, cfg.model.time_conditioning)
    if wrap_objective is not None:
        objective = wrap_objective(objective, model)
    engine = build_engine(cfg, model, objective, dims)
    if not hasattr(engine, 'all_reduce_dp'):
        engine.all_reduce_dp = lambda values: values
    return Components(engine.model, objective, engine)
