"""What a stage (pretraining, distillation, and later adaptation or fine-tuning) adds to the one step loop.

The loop (unmask.train.loop) owns stepping, logging, validation, saving, preemption, rollback after non-finite
steps and tracking; a stage supplies only what differs: its config adjustments and starting weights, the
objective the engine steps, extra state saved with every checkpoint, a hook after each step and extra log
fields. Anything stage-specific that must survive a resume lives in `state_dict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn

from unmask.config import Config


class Stage(Protocol):
    name: str  # "pretrain", "distill": the console prefix and the checkpoint meta's "stage"

    def prepare(self, cfg: Config, init_state: dict | None) -> tuple[Config, dict | None]:
        """The run's config and starting weights (distillation: the teacher's shape and weights)."""

    def wrap_objective(self, objective, model: nn.Module):
        """The objective the engine steps, built around the stage's base objective and the fresh model."""

    def describe(self) -> str:
        """One line for the console at start-up."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def log_fields(self) -> dict:
        """Extra fields of every training row and of the checkpoint meta."""

    def after_step(self, step: int, engine, say) -> None:
        """Runs after each optimizer step that was applied or skipped, before validation and saving."""

    def finish(self, cfg: Config, engine, run_dir: Path, is_main: bool, say) -> None:
        """Runs once when the last step is done (not after a preemption)."""


class Pretrain:
    """Masked-diffusion (or autoregressive) pretraining: the loop's behaviour with nothing added."""

    name = "pretrain"

    def prepare(self, cfg: Config, init_state: dict | None) -> tuple[Config, dict | None]:
        return cfg, init_state

    def wrap_objective(self, objective, model: nn.Module):
        return objective

    def describe(self) -> str:
        return ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def log_fields(self) -> dict:
        return {}

    def after_step(self, step: int, engine, say) -> None:
        pass

    def finish(self, cfg: Config, engine, run_dir: Path, is_main: bool, say) -> None:
        pass
