"""Building configs and reading run directories in tests."""

from __future__ import annotations

import json
from pathlib import Path

from unmask.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]


def tiny_config(shards: Path, run_dir: Path, *overrides: str) -> Config:
    """configs/tiny.toml on the `tiny_shards` fixture's data, writing into run_dir."""
    return load_config(REPO / "configs" / "tiny.toml", [
        f"--data.train_dir={shards / 'train'}", f"--data.val_dir={shards / 'val'}",
        f"--train.run_dir={run_dir}", *overrides])


def tiny_cli_args(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [str(REPO / "configs" / "tiny.toml"), f"--data.train_dir={shards / 'train'}",
            f"--data.val_dir={shards / 'val'}", f"--train.run_dir={run_dir}", *overrides]


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, later rows winning (a resumed run appends)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


# Subprocess timeouts are hang guards, never speed checks: generous enough for 2 loaded cores (pytest-timeout,
# configured in pyproject.toml, still ends a hung test with a stack dump well inside CI's time).
HANG_GUARD_S = 900
