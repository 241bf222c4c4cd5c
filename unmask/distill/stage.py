"""Distillation as a stage of the one step loop: a student initialised from the frozen teacher learns to sample in
fewer steps (`unmask distill CONFIG --teacher CKPT`).

Training runs `distill.rounds` rounds of `distill.steps_per_round` optimizer steps. At each round boundary the
student's weights are copied into the teacher and the teacher's sampling steps halve. The round, the teacher's
steps and the teacher's weights are saved with every checkpoint, so a resume (or a rollback) mid-round is exact.
For Duo's DCD this is its schedule: the boundary is the hard teacher refresh every update_teacher_every
(= steps_per_round) steps, and round n's teacher step dt = 1 / (start_steps >> n) = 2^n / T, T = start_steps.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from unmask.config import Config
from unmask.distill.objective import build_distill_objective, frozen_copy
from unmask.errors import ConfigError


def prepare_config(cfg: Config, teacher: str | None) -> tuple[Config, dict]:
    """The run's config (the teacher's model shape, train.steps = rounds x steps_per_round) and the teacher's
    weights (the checkpoint's EMA of them when it has one, as `distill.teacher_weights` says). Refuses layouts
    whose student weights are not whole on each rank (the teacher copy needs them), diffusion.anneal_steps,
    diffusion.token_reweighting, and a teacher of the wrong kind for distill.objective (`check_teacher`)."""
    from unmask.checkpoint.consolidate import load_checkpoint_weights

    path = teacher or cfg.distill.teacher
    if not path:
        raise ConfigError("distill: no teacher: pass --teacher CHECKPOINT or set distill.teacher")
    if cfg.parallel.tp > 1 or cfg.parallel.pp > 1 or cfg.parallel.zero_stage == 3:
        raise ConfigError(f"distill: parallel.tp={cfg.parallel.tp}, pp={cfg.parallel.pp}, "
                          f"zero_stage={cfg.parallel.zero_stage}: distillation needs whole weights on each rank "
                          "(use data parallelism with zero_stage <= 2)")
    if cfg.diffusion.anneal_steps:  # the run's [diffusion] is the teacher's (below): the key would do nothing
        raise ConfigError(f"distill: diffusion.anneal_steps={cfg.diffusion.anneal_steps} anneals attention while "
                          "adapting a causal LM; the teacher is already annealed and the student trains at full "
                          "attention: remove diffusion.anneal_steps from the distill config")
    if cfg.diffusion.token_reweighting != "none":  # likewise; and the distill losses weigh no tokens
        raise ConfigError(f"distill: diffusion.token_reweighting={cfg.diffusion.token_reweighting!r} weighs the "
                          "masked-diffusion loss; distillation matches the teacher instead: remove "
                          "diffusion.token_reweighting from the distill config")
    teacher_cfg, state = load_checkpoint_weights(path, weights=cfg.distill.teacher_weights)
    check_teacher(cfg.distill.objective, teacher_cfg.diffusion.objective, path)
    cfg = cfg.model_copy(deep=True)
    cfg.model = teacher_cfg.model
    # Distillation runs the reverse process from a time t to s: its x_t must come from a time, whichever estimator
    # trained the teacher (a count-based corruption has none). An adapted teacher's anneal_steps is dropped: its
    # annealing is done, and the distill objectives run student and teacher at full attention; a CART teacher's
    # token_reweighting is dropped too (the divergence weighs no tokens), and so is a duo teacher's training
    # curriculum (DCD makes its own Gaussian trajectories).
    cfg.diffusion = teacher_cfg.diffusion.model_copy(update={"estimator": "continuous", "anneal_steps": 0,
                                                             "token_reweighting": "none", "curriculum_start": 0,
                                                             "curriculum_end": 0})
    cfg.distill.teacher = str(path)
    cfg.train.steps = cfg.distill.rounds * cfg.distill.steps_per_round
    return cfg, state


TEACHERS = {"sdtt": "mdlm", "masked_consistency": "mdlm", "dcd": "duo"}  # the teacher objective each one distils


def check_teacher(objective: str, teacher_objective: str, path) -> None:
    """Each distillation objective reads one kind of teacher: refuse the others, naming the right choice."""
    if TEACHERS[objective] == teacher_objective:
        return
    fits = [name for name, kind in TEACHERS.items() if kind == teacher_objective]
    fix = (f"set distill.objective to {' or '.join(repr(f) for f in fits)}" if fits else
           "distil a masked-diffusion (mdlm) or uniform-state (duo) checkpoint")
    raise ConfigError(f"distill: teacher {path} is a diffusion.objective={teacher_objective!r} model; "
                      f"distill.objective={objective!r} needs a {TEACHERS[objective]!r} teacher: {fix}")


class Distill:
    """The stage: the student starts as the teacher; the objective holds the frozen teacher."""

    name = "distill"

    def __init__(self, teacher: str | None = None):
        self.teacher_path = teacher
        self.objective = None
        self.round = 0

    def prepare(self, cfg: Config, init_state: dict | None) -> tuple[Config, dict]:
        self.cfg, state = prepare_config(cfg, self.teacher_path)
        return self.cfg, state  # the student starts as the teacher

    def wrap_objective(self, objective, model: nn.Module):
        self.objective = build_distill_objective(self.cfg.distill, objective,
                                                 frozen_copy(model, self.cfg.distill.teacher_dtype))
        self.objective.set_round(self.round)
        return self.objective

    def describe(self) -> str:
        d = self.cfg.distill
        return (f"{d.objective} from {d.teacher}, {d.rounds} rounds {d.start_steps} -> {d.final_steps} steps, "
                f"round {self.round}")

    def state_dict(self) -> dict:
        return {"round": self.round, "teacher": self.objective.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]
        self.objective.replace_teacher(state["teacher"])
        self.objective.set_round(self.round)

    def log_fields(self) -> dict:
        return {"round": self.round, "teacher_steps": self.objective.steps}

    def after_step(self, step: int, engine, say) -> None:
        """At a round boundary (not after the last round) the student so far becomes the teacher and the
        teacher's sampling steps halve."""
        if step % self.cfg.distill.steps_per_round or step >= self.cfg.train.steps:
            return
        self.objective.replace_teacher({k: v.detach().clone() for k, v in engine.model.state_dict().items()})
        self.round += 1
        self.objective.set_round(self.round)
        say(f"round {self.round}: teacher replaced by the student, {self.objective.steps} steps")

    def finish(self, cfg: Config, engine, run_dir: Path, is_main: bool, say) -> None:
        if cfg.distill.eval and is_main:
            from unmask.distill.evaluate import evaluate_run

            evaluate_run(cfg, engine.model, run_dir, say)


def distill(cfg: Config, teacher: str | None = None) -> dict:
    """Distil the teacher checkpoint into a student initialised from it; returns the last validation row."""
    from unmask.train.loop import train

    return train(cfg, stage=Distill(teacher))
