"""Uniform-state diffusion (Duo) through the whole tool: `unmask train` with diffusion.objective = "duo" on the demo
corpus lowers the held-out bound, with Duo's curriculum on for the first steps; `unmask eval` scores the run with the
same bound; the export loads in transformers alone with the same logits; `--init-from` an untimed mdlm export starts
a duo run from the same network."""

import math

import pytest
import torch

from tests.support.fresh_hf import run_fresh
from tests.support.runs import metrics, tiny_cli_args, tiny_config
from unmask.checkpoint.consolidate import load_model
from unmask.cli import main
from unmask.eval.api import likelihood
from unmask.inference import load
from unmask.train.loop import train

pytestmark = pytest.mark.slow
DUO = ("--diffusion.objective=duo", "--model.time_conditioning=true", "--diffusion.curriculum_start=10",
       "--diffusion.curriculum_end=40", "--train.threads=1")
STEPS = 120


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("duo") / "run"
    train(tiny_config(tiny_shards, run_dir, *DUO, f"--train.steps={STEPS}", "--train.log_every=10",
                      "--train.val_every=20", "--train.val_batches=2", f"--checkpoint.interval_steps={STEPS}"))
    return run_dir


def test_training_lowers_the_bound(trained):
    val = {r["step"]: r["val_nelbo"] for r in metrics(trained) if "val_nelbo" in r}
    assert sorted(val) == [20, 40, 60, 80, 100, 120]
    # An untrained network's x_theta is near uniform: its bound is about log V (closed form, unit tests).
    assert val[20] < math.log(512)
    assert val[120] < val[20] - 0.3, val
    assert val[120] < val[40] - 0.1, val  # still falling after the curriculum hands over to the true ELBO


def test_eval_likelihood_scores_the_run_with_its_bound(trained, tiny_shards):
    """`unmask eval`'s likelihood (its samples belong to the samplers) on the validation split."""
    loaded = load(trained)
    assert loaded.objective == "duo"
    result = likelihood(loaded, str(tiny_shards / "val"), batches=2, batch_size=16, time_samples=8)
    last = [r["val_nelbo"] for r in metrics(trained) if "val_nelbo" in r][-1]
    assert result["nats_per_token"] == pytest.approx(last, abs=0.3)


def test_export_loads_in_transformers_alone_with_equal_logits(trained, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(trained), "--out", str(out)]) == 0
    assert "uniform-state" in (out / "README.md").read_text()
    cfg, model, _, _ = load_model(trained)
    tokens = torch.randint(5, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.9])
    got = run_fresh([{"folder": str(out), "tokens": tokens, "t": t, "templates": [], "options": []}], tmp_path)[0]
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(tokens, t), atol=1e-5, rtol=0)


def test_init_from_an_untimed_mdlm_export_keeps_its_function(tiny_shards, tmp_path):
    """A duo run may start from an mdlm (or AR) export without time conditioning: it gains a time embedding and
    adaLN whose gates start open, so the new network computes the source's logits for any t."""
    from unmask.checkpoint.consolidate import load_checkpoint_weights

    source = tmp_path / "mdlm"
    train(tiny_config(tiny_shards, source, "--train.steps=2", "--checkpoint.interval_steps=2",
                      "--train.micro_batch_size=4", "--train.val_every=0", "--train.threads=1"))
    assert main(["export", "--checkpoint", str(source), "--out", str(tmp_path / "hf")]) == 0
    run_dir = tmp_path / "duo"
    args = [*tiny_cli_args(tiny_shards, run_dir, "--diffusion.objective=duo", "--model.time_conditioning=true",
                           "--train.steps=1", "--checkpoint.interval_steps=1", "--train.micro_batch_size=4",
                           "--optim.lr=1e-9", "--train.val_every=0", "--train.threads=1")]
    assert main(["train", *args, "--init-from", str(tmp_path / "hf")]) == 0
    _, mdlm, _, _ = load_model(source)
    cfg, duo, _, _ = load_model(run_dir)
    assert cfg.model.time_conditioning and not mdlm.cfg.time_conditioning
    tokens = torch.randint(5, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (0.1, 0.9):
            torch.testing.assert_close(duo(tokens, torch.full((2,), t)), mdlm(tokens), atol=1e-4, rtol=0)
    _, weights = load_checkpoint_weights(run_dir)
    assert any(k.startswith("time_embedding.") for k in weights)
