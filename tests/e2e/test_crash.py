"""Crashes and preemption through the real CLI: kill -9 at random moments (one inside a save), SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.support.runs import metrics, tiny_cli_args
from unmask.launcher.env import REQUEUE_EXIT_CODE

STEPS = 40
ARGS = (f"--train.steps={STEPS}", "--train.log_every=1", "--train.val_every=0", "--train.micro_batch_size=4",
        "--checkpoint.interval_steps=1", "--checkpoint.keep_last=2", "--train.threads=1")


def start(shards: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "unmask", "train", *tiny_cli_args(shards, run_dir, *ARGS)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.001) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("the training process made no progress")


def trained(run_dir: Path) -> int:
    """Training rows logged so far (a resumed run appends)."""
    return len([r for r in metrics(run_dir) if "loss" in r])


def final_model(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / f"step-{STEPS:08d}" / "engine" / "engine.pt"
    return torch.load(path, weights_only=True)["model"]


def finish(shards: Path, run_dir: Path) -> None:
    proc = start(shards, run_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out


def test_kill_9_at_random_moments_loses_nothing(tiny_shards, tmp_path):
    finish(tiny_shards, tmp_path / "whole")
    run_dir, rng = tmp_path / "killed", random.Random(1234)
    root = run_dir / "checkpoints"
    killed_in_save = 0
    for moment in ("random", "in-save", "random"):
        proc = start(tiny_shards, run_dir)
        done = trained(run_dir)
        # A random moment: a random number of steps into this start, plus a random fraction of a step.
        target = done + (rng.randint(1, 6) if moment == "random" else 1)
        assert wait_for(lambda target=target: trained(run_dir) >= target, proc), "the run ended before the kill"
        if moment == "in-save":
            for _ in range(20):  # a save happens every step; catch one while its .tmp- folder exists
                if wait_for(lambda: any(root.glob(".tmp-step-*")), proc):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    if any(root.glob(".tmp-step-*")):
                        killed_in_save += 1
                        break
                proc = start(tiny_shards, run_dir)
        else:
            time.sleep(rng.uniform(0.0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert killed_in_save == 1
    finish(tiny_shards, run_dir)
    whole, resumed = final_model(tmp_path / "whole"), final_model(run_dir)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not list(root.glob(".tmp-*"))


def test_sigterm_saves_and_exits_with_the_requeue_code(tiny_shards, tmp_path):
    proc = start(tiny_shards, tmp_path)
    assert wait_for(lambda: len(metrics(tmp_path)) >= 3, proc, poll=0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, out
    assert "preempted; checkpoint saved" in out
    last = max(r["step"] for r in metrics(tmp_path) if "loss" in r)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step-{last:08d}"
