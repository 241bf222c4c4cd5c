"""Training from shards served over HTTP: the same losses as from disk, and a resume after a kill -9 continues them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.support.http_serve import serve
from tests.support.runs import HANG_GUARD_S, tiny_cli_args, tiny_config, train_losses
from unmask.data.loader import ShardLoader
from unmask.errors import DataError
from unmask.train.loop import train

FAST = ("--train.steps=8", "--train.log_every=1", "--train.val_every=0", "--train.micro_batch_size=4",
        "--checkpoint.interval_steps=4", "--train.threads=1", "--data.num_workers=2")


def test_http_run_resumes_after_a_kill_with_the_losses_of_a_disk_run(tiny_shards, tmp_path):
    train(tiny_config(tiny_shards, tmp_path / "disk", *FAST))
    with serve(tiny_shards) as (url, requests):
        remote = (f"--data.train_dir={url}/train", f"--data.val_dir={url}/val")
        killed = subprocess.run([sys.executable, "-m", "unmask", "train",
                                 *tiny_cli_args(tiny_shards, tmp_path / "http", *FAST, *remote)],
                                env={**os.environ, "UNMASK_FAULTS": "step.end@6=kill"}, capture_output=True,
                                text=True, timeout=HANG_GUARD_S)  # SIGKILL after step 6; last checkpoint: step 4
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        train(tiny_config(tiny_shards, tmp_path / "http", *FAST, *remote))  # resumes 5..8 from the checkpoint
    disk, http = train_losses(tmp_path / "disk"), train_losses(tmp_path / "http")
    assert sorted(http) == list(range(1, 9)) and http == disk
    assert any(r.startswith("/train/shard-") for r in requests)


def test_an_unreachable_url_is_named(tiny_shards):
    with serve(tiny_shards) as (url, _):
        pass  # stopped: nothing listens on that port any more
    with pytest.raises(DataError, match=rf"cannot read {url}/train/manifest\.json after 2 attempt"):
        ShardLoader(f"{url}/train", 4, seq_len=128, model_vocab_size=512, retries=1)
