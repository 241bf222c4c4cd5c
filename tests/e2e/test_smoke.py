"""The fastest end-to-end check (`make test-fast` runs it): the CLI trains the tiny model a few steps on real
shards, saves, and a second invocation resumes from that checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.runs import metrics, tiny_cli_args

pytestmark = pytest.mark.smoke


def test_cli_trains_saves_and_resumes(tiny_shards, tmp_path):
    args = ("--train.log_every=1", "--train.val_every=2", "--train.val_batches=1", "--train.micro_batch_size=2",
            "--checkpoint.interval_steps=2", "--train.threads=1")
    for steps in (2, 4):
        proc = subprocess.run([sys.executable, "-m", "unmask", "train",
                               *tiny_cli_args(tiny_shards, tmp_path, f"--train.steps={steps}", *args)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_nelbo" in r] == [2, 4]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000004"
