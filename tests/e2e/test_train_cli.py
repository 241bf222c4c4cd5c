"""`unmask train` end to end: the AR baseline learns, bad input is one clear line. (The masked-diffusion model
learning to use context is in test_sample_quality.py, which also judges its samples.)"""

from __future__ import annotations

import subprocess
import sys

from tests.support.runs import metrics, tiny_cli_args


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unmask", "train", *args], capture_output=True, text=True,
                          timeout=900)


def test_autoregressive_baseline_trains_on_the_same_shards(tiny_shards, tmp_path):
    proc = run_cli(*tiny_cli_args(tiny_shards, tmp_path, "--diffusion.objective=ar", "--train.steps=100",
                                  "--train.val_every=0", "--checkpoint.interval_steps=0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    val = [r for r in metrics(tmp_path) if "val_nelbo" in r][-1]
    print(f"\nAR held-out NLL {val['val_nelbo']:.4f} nats/token vs unigram {val['val_unigram_entropy']:.4f}")
    assert val["val_nelbo"] < val["val_unigram_entropy"]


def test_bad_data_dir_is_one_clear_line(tmp_path):
    proc = run_cli(f"--data.train_dir={tmp_path}/nope", "--model.size=tiny")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "nope" in proc.stderr, proc.stderr
