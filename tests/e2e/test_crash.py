"""Crashes and preemption through the real CLI, at named fault points (unmask.faults) rather than timed races:
kill -9 after random steps and inside a save, and a real SIGTERM delivered while the run waits at a step's end."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.support.runs import HANG_GUARD_S, metrics, tiny_cli_args
from unmask.launcher.env import REQUEUE_EXIT_CODE

STEPS = 16
ARGS = (f"--train.steps={STEPS}", "--train.log_every=1", "--train.val_every=0", "--train.micro_batch_size=4",
        "--checkpoint.interval_steps=1", "--checkpoint.keep_last=2", "--train.threads=1")


def start(shards: Path, run_dir: Path, faults: str = "") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "UNMASK_FAULTS": faults}
    return subprocess.Popen([sys.executable, "-m", "unmask", "train", *tiny_cli_args(shards, run_dir, *ARGS)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(shards: Path, run_dir: Path, faults: str = "") -> subprocess.CompletedProcess:
    proc = start(shards, run_dir, faults)
    out, _ = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def trained(run_dir: Path) -> int:
    """The last training step logged so far (a resumed run appends)."""
    return max((r["step"] for r in metrics(run_dir) if "loss" in r), default=0)


def final_model(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / f"step-{STEPS:08d}" / "engine" / "engine.pt"
    return torch.load(path, weights_only=True)["model"]


def test_kill_9_after_random_steps_and_inside_a_save_loses_nothing(tiny_shards, tmp_path):
    assert run(tiny_shards, tmp_path / "whole").returncode == 0
    run_dir, rng = tmp_path / "killed", random.Random(1234)
    root = run_dir / "checkpoints"
    for point in ("step.end", "save.written", "step.end"):
        step = trained(run_dir) + rng.randint(1, 4)
        killed = run(tiny_shards, run_dir, f"{point}@{step}=kill")
        assert killed.returncode == -signal.SIGKILL, killed.stdout
        assert trained(run_dir) == step
        if point == "save.written":  # every file of the save is written, the folder is not yet renamed
            assert (root / f".tmp-step-{step:08d}" / "manifest.json").is_file()
            assert (root / "latest").read_text().strip() == f"step-{step - 1:08d}"
    finished = run(tiny_shards, run_dir)
    assert finished.returncode == 0, finished.stdout
    whole, resumed = final_model(tmp_path / "whole"), final_model(run_dir)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not list(root.glob(".tmp-*"))


def test_sigterm_saves_and_exits_with_the_requeue_code(tiny_shards, tmp_path):
    proc = start(tiny_shards, tmp_path, "step.end@3=pause")
    for line in proc.stdout:  # the run is now waiting at the end of step 3, before its preemption check
        if "paused at step.end@3" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == REQUEUE_EXIT_CODE, out
    assert "preempted; checkpoint saved" in out
    assert trained(tmp_path) == 3
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000003"
