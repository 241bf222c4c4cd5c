"""A briefly trained model, end to end through the CLI: `unmask train` on all of Shakespeare, then `unmask eval`
with SmolLM2-135M (the eval extra) as the independent judge of generative perplexity.

Budget, measured on 2 CPU cores: 4000 steps of the `tiny` model (~8M tokens, ~4 minutes) take the held-out
NELBO to 3.61 nats/token (unigram entropy 4.87). At that stage a sample drawn at temperature 1 still spells
many words wrong (gen. perplexity 1327, above word-shuffled real text's 1170: a reference LM forgives shuffled
*real* words more than misspelt ones); top-k 20 sampling (entropy 3.90 against real text's 4.03, so no
collapse) scores 663 (4.12 bits/byte against shuffled text's 2.82). All are printed; the check
against shuffled text is on top-k samples, per reference token.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.support.runs import metrics, tiny_cli_args
from unmask.config import load_config

SAMPLES, LENGTH, STEPS = 32, 128, 128


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unmask", *args], capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def trained(shakespeare_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("quality")
    # Two threads pin the floating-point reduction order: how soon a run this small leaves its unigram plateau
    # varies with the arithmetic (seeds or thread counts move it by hundreds of steps).
    proc = cli("train", *tiny_cli_args(shakespeare_shards, run, "--train.steps=4000", "--optim.lr=3e-3",
                                       "--train.threads=2", "--train.val_every=1000", "--train.log_every=250",
                                       "--checkpoint.interval_steps=0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


def test_masked_diffusion_beats_the_unigram_entropy(trained):
    val = [r for r in metrics(trained) if "val_nelbo" in r]
    for r in val:
        print(f"\nstep {r['step']}: held-out NELBO {r['val_nelbo']:.4f} nats/token (perplexity bound "
              f"{r['val_ppl_bound']:.1f}) vs unigram entropy {r['val_unigram_entropy']:.4f}, {r['val_tokens']} tokens")
    assert [r["step"] for r in val] == [1000, 2000, 3000, 4000]
    assert val[-1]["val_nelbo"] < val[0]["val_nelbo"] < val[0]["val_unigram_entropy"]
    assert val[-1]["val_nelbo"] < val[-1]["val_unigram_entropy"] - 0.4  # context is worth 0.4 nat and more
    rows = [r for r in metrics(trained) if "loss" in r]
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[-1])
    assert load_config(trained / "config.toml").model.size == "tiny"  # the resolved config is in the run dir


def test_samples_beat_the_untrained_model_and_shuffled_text(trained, tmp_path):
    from unmask.eval.api import load_reference, samples_at
    from unmask.inference import load

    common = ("--reference", "smollm2", "--steps", str(STEPS), "--num-samples", str(SAMPLES),
              "--length", str(LENGTH), "--batches", "2")
    runs = {}
    for name, extra in (("temperature 1", ()), ("top-k 20", ("--top-k", "20"))):
        out = tmp_path / f"{name.replace(' ', '_')}.json"
        proc = cli("eval", "--checkpoint", str(trained), *common, *extra, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads(out.read_text())
    baselines = runs["top-k 20"]["text_baselines"]
    # The untrained model: the same network at its initial weights, sampled the same two ways.
    loaded = load(trained)
    torch.manual_seed(0)
    loaded.model.init_weights()
    reference = load_reference("smollm2")
    untrained = {name: samples_at(loaded, STEPS, reference, num_samples=SAMPLES, length=LENGTH,
                                  seed=0, top_k=k)
        for name, k in (("temperature 1", 0), ("top-k 20", 20))}

    real, shuffled = baselines["real_text"], baselines["shuffled_words"]
    print(f"\nunder SmolLM2-135M, {SAMPLES} samples x {LENGTH} tokens, {STEPS} steps: gen. perplexity per "
          "reference token, bits per byte, unigram entropy")
    print(f"  held-out text            {real['gen_ppl']:8.1f} {real['gen_bits_per_byte']:6.3f} "
          f"{real['unigram_entropy']:6.3f}")
    print(f"  word-shuffled held-out   {shuffled['gen_ppl']:8.1f} {shuffled['gen_bits_per_byte']:6.3f}")
    for name, res in runs.items():
        row, init = res["samples"][0], untrained[name]
        for who, r in (("trained", row), ("untrained", init)):
            label = f"{who}, {name}"
            print(f"  {label:24} {r['gen_ppl']:8.1f} {r['gen_bits_per_byte']:6.3f} {r['unigram_entropy']:6.3f}")
        assert row["nfe"] <= STEPS
        # Per byte, training wins whatever the sampler. (Per reference token, random pieces of a 512-piece vocab
        # at temperature 1 score ~1000, below this model's ~1300: the judge cuts them into many short tokens.)
        assert row["gen_bits_per_byte"] < init["gen_bits_per_byte"]

    top_k, init = runs["top-k 20"]["samples"][0], untrained["top-k 20"]
    assert top_k["gen_ppl"] < init["gen_ppl"]  # the metric, same sampler on both sides
    # The check, per reference token. (Per byte, shuffled real words still win: 2.82 against 4.12 bits
    # measured. Part of this win is that the judge cuts the samples' misspellings into many short tokens.)
    assert top_k["gen_ppl"] < shuffled["gen_ppl"]
    assert real["gen_ppl"] < top_k["gen_ppl"]  # the judge still tells real text apart
    assert top_k["unigram_entropy"] > 0.9 * real["unigram_entropy"]  # not a collapsed, repetitive sampler
