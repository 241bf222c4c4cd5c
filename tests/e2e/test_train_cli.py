"""`unmask train` end to end on real text (Shakespeare shards): the model learns to use context."""

from __future__ import annotations

import subprocess
import sys

from tests.support.runs import metrics, tiny_cli_args
from unmask.config import load_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unmask", "train", *args], capture_output=True, text=True,
                          timeout=900)


def test_masked_diffusion_beats_the_unigram_entropy(shakespeare_shards, tmp_path):
    proc = run_cli(*tiny_cli_args(shakespeare_shards, tmp_path, "--checkpoint.interval_steps=0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    val = [r for r in metrics(tmp_path) if "val_nelbo" in r][-1]
    print(f"\nheld-out NELBO {val['val_nelbo']:.4f} nats/token (perplexity bound {val['val_ppl_bound']:.1f}) vs "
          f"unigram entropy {val['val_unigram_entropy']:.4f} nats/token on the same {val['val_tokens']} tokens")
    assert val["step"] == 600
    assert val["val_nelbo"] < val["val_unigram_entropy"]
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[-1])
    assert load_config(tmp_path / "config.toml").model.size == "tiny"  # the resolved config is in the run dir


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
