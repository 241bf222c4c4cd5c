"""Engines run one optimizer step over a list of micro-batches behind one `Engine` interface: local (plain
PyTorch), DeepSpeed ZeRO (deepspeed.py) and DeepSpeed pipeline stages (pipeline.py). `build_components` builds
model, objective and engine together. DeepSpeed is imported only when a DeepSpeed engine is built."""

from unmask.engines.base import Engine, LocalWeights, StepStats, autocast
from unmask.engines.build import Components, build_components

__all__ = ["Components", "Engine", "LocalWeights", "StepStats", "autocast", "build_components"]
