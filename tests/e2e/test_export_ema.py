"""A run that keeps the weight EMA exports the EMA by default (and its raw weights with --raw-weights): the
transformers model's logits equal the plain model's with the consolidated EMA weights, not the raw ones."""

import pytest
import torch

from tests.support.fresh_hf import run_fresh
from tests.support.runs import tiny_config
from unmask.checkpoint.consolidate import load_model
from unmask.cli import main
from unmask.inference import load
from unmask.train.loop import train

pytestmark = pytest.mark.slow
FAST = ("--train.steps=4", "--train.log_every=1", "--train.val_every=0", "--data.val_dir=",
        "--train.micro_batch_size=4", "--checkpoint.interval_steps=4", "--train.threads=1", "--train.ema_decay=0.9")


def test_export_writes_the_ema_by_default_and_the_raw_weights_on_request(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(tiny_shards, run_dir, *FAST))
    for name, flags in (("ema", []), ("raw", ["--raw-weights"])):
        assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / name), *flags]) == 0
    assert "moving average of the trained weights" in (tmp_path / "ema" / "README.md").read_text()
    assert "raw trained weights" in (tmp_path / "raw" / "README.md").read_text()

    cfg, ema_model, _, _ = load_model(run_dir, weights="ema")
    _, raw_model, _, _ = load_model(run_dir, weights="raw")
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    jobs = [{"folder": str(tmp_path / name), "tokens": tokens, "t": None, "templates": [], "options": []}
            for name in ("ema", "raw")]
    got_ema, got_raw = run_fresh(jobs, tmp_path)
    with torch.no_grad():
        want_ema, want_raw = ema_model(tokens), raw_model(tokens)
    torch.testing.assert_close(got_ema["logits"], want_ema, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_raw["logits"], want_raw, atol=1e-5, rtol=0)
    assert (want_ema - want_raw).abs().max() > 1e-3  # the two exports really differ
    # `unmask sample` / `unmask eval` load the same way
    assert load(run_dir).weights == "ema" and load(run_dir, weights="raw").weights == "raw"
