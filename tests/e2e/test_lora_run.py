"""LoRA runs through the CLI: `unmask train --init-from EXPORT --lora.rank=...` resumes exactly after kill -9, keeps
the base weights it started from, and `unmask export` writes merged plain weights that load in transformers alone
with the adapted model's logits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.support.fresh_hf import run_fresh
from tests.support.runs import HANG_GUARD_S, tiny_cli_args, tiny_config, train_losses
from unmask.checkpoint.consolidate import load_checkpoint_weights
from unmask.cli import main
from unmask.export.hf import export
from unmask.model.build import build_model
from unmask.model.lora import add_lora, merge_lora
from unmask.train.loop import train

pytestmark = pytest.mark.slow
STEPS = 8
LORA = (f"--train.steps={STEPS}", "--train.log_every=1", "--train.val_every=0", "--train.micro_batch_size=4",
        "--checkpoint.interval_steps=1", "--checkpoint.keep_last=2", "--train.threads=1", "--lora.rank=4",
        "--lora.alpha=8", "--lora.target_modules=[\"wq\", \"wv\", \"w1\", \"w2\"]", "--optim.lr=1e-2",
        "--optim.warmup_steps=0")


@pytest.fixture(scope="module")
def base_export(tiny_shards, tmp_path_factory):
    """A briefly pretrained tiny model, exported: what a LoRA run starts from."""
    root = tmp_path_factory.mktemp("lora")
    train(tiny_config(tiny_shards, root / "base", "--train.steps=2", "--train.val_every=0", "--train.threads=1",
                      "--train.micro_batch_size=4", "--checkpoint.interval_steps=2"))
    return export(root / "base", root / "hf")


def lora_run(shards, run_dir, hf, faults: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "UNMASK_FAULTS": faults}
    return subprocess.run([sys.executable, "-m", "unmask", "train", *tiny_cli_args(shards, run_dir, *LORA),
                           "--init-from", str(hf)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=HANG_GUARD_S)


def engine_state(run_dir) -> dict:
    path = run_dir / "checkpoints" / f"step-{STEPS:08d}" / "engine" / "engine.pt"
    return torch.load(path, weights_only=True)["model"]


def test_kill_9_then_resume_is_exact_and_the_base_stays_frozen(tiny_shards, base_export, tmp_path):
    whole = lora_run(tiny_shards, tmp_path / "whole", base_export)
    assert whole.returncode == 0, whole.stdout
    killed = lora_run(tiny_shards, tmp_path / "killed", base_export, f"step.end@{STEPS // 2 + 1}=kill")
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    resumed = lora_run(tiny_shards, tmp_path / "killed", base_export)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout
    a, b = train_losses(tmp_path / "whole"), train_losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, STEPS + 1)) and a == b  # bit-identical floats
    wa, wb = engine_state(tmp_path / "whole"), engine_state(tmp_path / "killed")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    _, merged = load_checkpoint_weights(tmp_path / "whole")
    _, init = load_checkpoint_weights(base_export.parent / "base")
    frozen = {k.replace(".base_layer", ""): v for k, v in wa.items() if ".lora_" not in k}
    assert frozen.keys() == init.keys() and all(torch.equal(frozen[k], init[k]) for k in init)
    moved = {k for k in init if not torch.equal(merged[k], init[k])}  # the merged weights: adapted modules only
    assert moved == {f"layers.{i}.{m}.weight" for i in range(2) for m in ("attention.wq", "attention.wv",
                                                                          "feed_forward.w1", "feed_forward.w2")}


def test_export_is_merged_and_gives_the_adapted_models_logits(tiny_shards, base_export, tmp_path):
    run_dir = tmp_path / "run"
    assert lora_run(tiny_shards, run_dir, base_export).returncode == 0
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    cfg, merged = load_checkpoint_weights(run_dir)
    assert not any("lora" in k or "base_layer" in k for k in merged)
    adapted = add_lora(build_model(cfg.model), cfg)
    adapted.load_state_dict(engine_state(run_dir))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    got = run_fresh([{"folder": str(out), "tokens": tokens, "t": None, "templates": [], "options": []}], tmp_path)[0]
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], adapted.eval()(tokens), atol=1e-5, rtol=0)


def test_the_ema_averages_the_adapters_and_readers_merge_it_into_the_frozen_base(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, "--train.steps=4", "--train.val_every=0", "--train.val_batches=1",
                      "--train.threads=1", "--train.micro_batch_size=4", "--checkpoint.interval_steps=4",
                      "--lora.rank=4", "--lora.alpha=8", "--optim.lr=1e-2", "--optim.warmup_steps=0",
                      "--train.ema_decay=0.5")
    train(cfg)
    step = tmp_path / "checkpoints" / "step-00000004"
    engine = torch.load(step / "engine" / "engine.pt", weights_only=True)["model"]
    averaged = torch.load(step / "ema" / "tp00-pp00-dp00000.pt", weights_only=True)["tensors"]
    assert averaged.keys() == {k for k in engine if ".lora_" in k}
    _, ema = load_checkpoint_weights(tmp_path, weights="ema")
    _, raw = load_checkpoint_weights(tmp_path, weights="raw")
    expected = merge_lora({**engine, **averaged}, cfg)
    assert ema.keys() == expected.keys() and all(torch.equal(ema[k], expected[k]) for k in ema)
    assert not torch.equal(ema["layers.0.attention.wq.weight"], raw["layers.0.attention.wq.weight"])
