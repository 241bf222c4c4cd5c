"""Adapting a causal LM (issue 16) through the real CLI: `unmask train --init-from LLAMA_FOLDER` with Dream's shifted
logits and DiffuLLaMA's attention annealing resumes exactly after a kill -9, like pretraining (test_crash.py), and
the resumed run takes its weights from the checkpoint, not from --init-from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.support.runs import HANG_GUARD_S, REPO, metrics, train_losses
from tests.unit.test_import_causal_lm import save_tokenizer
from unmask.data.prepare import PrepareOptions, prepare_data

WORDS, ROWS = 200, 256  # tokenizer words; embedding rows (spare ones: <mask> is appended in a spare row)
STEPS, ANNEAL, KILL = 8, 6, 3  # the kill lands mid-anneal; the resumed run anneals on, then attends fully
ARGS = (f"--train.steps={STEPS}", f"--diffusion.anneal_steps={ANNEAL}", "--model.shift_logits=true",
        "--train.seq_len=32", "--train.micro_batch_size=4", "--train.log_every=1", "--train.val_every=0",
        "--checkpoint.interval_steps=1", "--checkpoint.keep_last=2", "--train.threads=1")


def save_llama(folder: Path, seed: int) -> Path:
    """A tiny random LlamaForCausalLM with the word-level tokenizer of test_import_causal_lm."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, max_position_embeddings=64, vocab_size=ROWS, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder, WORDS)
    return folder


def shards(tmp_path: Path, folder: Path) -> Path:
    """prepare-data with the source model's tokenizer, so the shards' special ids are the ones --init-from derives."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(3)
    for d in range(40):
        ids = torch.randint(4, WORDS, (int(torch.randint(20, 60, (1,), generator=g)),), generator=g)
        (corpus / f"{d}.txt").write_text(" ".join(f"w{i}" for i in ids.tolist()))
    out = tmp_path / "data"
    prepare_data(PrepareOptions(inputs=[str(corpus)], out=out, seq_len=32, tokenizer=folder, val_fraction=0.2,
                                workers=1, progress=False))
    return out


def run(data: Path, run_dir: Path, source: Path, faults: str = "", *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "UNMASK_FAULTS": faults}
    cmd = [sys.executable, "-m", "unmask", "train", str(REPO / "configs" / "tiny.toml"), "--init-from", str(source),
           f"--data.train_dir={data / 'train'}", f"--data.val_dir={data / 'val'}", f"--train.run_dir={run_dir}", *ARGS,
           *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def final_model(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / f"step-{STEPS:08d}" / "engine" / "engine.pt"
    return torch.load(path, weights_only=True)["model"]


def test_adaptation_resumes_exactly_after_kill_9_and_ignores_init_from(tmp_path):
    source, other = save_llama(tmp_path / "llama", seed=0), save_llama(tmp_path / "other", seed=1)
    data = shards(tmp_path, source)
    whole = run(data, tmp_path / "whole", source)
    assert whole.returncode == 0, whole.stderr[-4000:]
    killed = run(data, tmp_path / "killed", source, f"step.end@{KILL}=kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert max(r["step"] for r in metrics(tmp_path / "killed") if "loss" in r) == KILL
    # The resume names another model of the same shape: its weights must not replace the checkpoint's.
    resumed = run(data, tmp_path / "killed", other)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    # kill at step.end@3 comes before step 3's save: the run resumes from step 2 and trains step 3 again
    assert f"step-{KILL - 1:08d} at step {KILL - 1}" in resumed.stdout
    a, b = train_losses(tmp_path / "whole"), train_losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, STEPS + 1)) and a == b  # bit-identical floats, annealed steps and full ones
    w, r = final_model(tmp_path / "whole"), final_model(tmp_path / "killed")
    assert w.keys() == r.keys() and all(torch.equal(w[k], r[k]) for k in w)
    fresh = run(data, tmp_path / "fresh", other)  # the control: from `other`, the same run trains differently
    assert fresh.returncode == 0, fresh.stderr[-4000:]
    assert train_losses(tmp_path / "fresh")[STEPS] != a[STEPS]


def test_a_duo_adaptation_trains_from_the_causal_lm_and_samples_with_the_uniform_sampler(tmp_path):
    """Uniform-state (Duo) adaptation through the CLI: --init-from adds time conditioning to the causal source, the
    run anneals and trains on uniform noise, and the result is an ordinary duo model to the uniform sampler."""
    from unmask.eval.api import samples_at
    from unmask.inference import load

    source = save_llama(tmp_path / "llama", seed=0)
    data = shards(tmp_path, source)
    done = run(data, tmp_path / "duo", source, "", "--diffusion.objective=duo", "--model.time_conditioning=true")
    assert done.returncode == 0, done.stderr[-4000:]
    losses = train_losses(tmp_path / "duo")
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(map(torch.isfinite, torch.tensor([*losses.values()])))
    loaded = load(tmp_path / "duo")
    assert loaded.process == "uniform" and loaded.model_cfg.shift_logits and loaded.model_cfg.time_conditioning
    row = samples_at(loaded, 4, num_samples=2, length=16, seed=0, keep_texts=True)
    assert row["nfe"] == 5 and len(row["texts"]) == 2  # 4 ancestral steps and Duo's greedy tail
    # ... and a teacher for Duo's DCD, which keeps the shifted head and drops the annealing
    cmd = [sys.executable, "-m", "unmask", "distill", str(REPO / "configs" / "tiny.toml"), "--teacher",
           str(tmp_path / "duo"), f"--data.train_dir={data / 'train'}", f"--data.val_dir={data / 'val'}",
           f"--train.run_dir={tmp_path / 'dcd'}", "--distill.objective=dcd", "--distill.start_steps=4",
           "--distill.final_steps=2", "--distill.steps_per_round=2", "--distill.eval=false", "--train.seq_len=32",
           "--train.micro_batch_size=4", "--train.val_every=0", "--train.threads=1", "--train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    distilled = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert distilled.returncode == 0, distilled.stderr[-4000:]
    assert sorted(train_losses(tmp_path / "dcd")) == [1, 2]
    student = load(tmp_path / "dcd")
    assert student.process == "uniform" and student.model_cfg.shift_logits
    assert student.config.diffusion.anneal_steps == 0
