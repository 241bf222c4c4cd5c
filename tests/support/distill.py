"""Reading a distillation run's checkpoints: the student and the teacher it held at a step."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def checkpoint(run: Path, step: int) -> tuple[dict, dict, dict]:
    """(meta, student weights, teacher weights) of a saved step."""
    path = run / "checkpoints" / f"step-{step:08d}"
    meta = json.loads((path / "meta.json").read_text())
    student = torch.load(path / "engine" / "engine.pt", weights_only=True)["model"]
    client = torch.load(path / "client" / "rank-00000.pt", weights_only=True)
    return meta, student, client["stage"]["teacher"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
