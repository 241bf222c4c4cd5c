"""`unmask sample` and `unmask eval` on a briefly trained tiny checkpoint and on its export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.runs import tiny_config
from unmask.train.loop import train


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_eval")
    fast = ("--train.steps=20", "--train.val_every=0", "--train.threads=1", "--checkpoint.interval_steps=0")
    train(tiny_config(tiny_shards, root / "mdlm", *fast))
    train(tiny_config(tiny_shards, root / "ar", *fast, "--diffusion.objective=ar"))
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unmask", *args], capture_output=True, text=True, timeout=600)


def rows(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_unconditional_prompt_and_infill(runs):
    ckpt = str(runs / "mdlm")
    out = rows(cli("sample", "--checkpoint", ckpt, "--num-samples", "2", "--length", "32", "--steps", "8"))
    assert len(out) == 2 and all(r["nfe"] <= 8 and len(r["tokens"]) > 0 for r in out)
    out = rows(cli("sample", "--checkpoint", ckpt, "--prompt", "Shall I compare thee", "--length", "32",
                   "--steps", "8"))
    assert out[0]["prompt"] == "Shall I compare thee" and out[0]["generated_tokens"] > 10
    out = rows(cli("sample", "--checkpoint", ckpt, "--prompt", "To be, or not to be: <mask:5> is the question",
                   "--steps", "4"))
    assert out[0]["text"].startswith("To be, or not to be: ") and out[0]["text"].endswith(" is the question")


def test_export_samples_like_the_checkpoint(runs, tmp_path):
    export = cli("export", "--checkpoint", str(runs / "mdlm"), "--out", str(tmp_path / "hf"))
    assert export.returncode == 0, export.stderr
    args = ("--num-samples", "2", "--length", "24", "--steps", "6", "--seed", "3")
    a = rows(cli("sample", "--checkpoint", str(runs / "mdlm"), *args))
    b = rows(cli("sample", "--checkpoint", str(tmp_path / "hf"), *args))
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]


def test_ar_run_decodes_left_to_right_and_its_kv_cache_is_exact(runs):
    args = ("sample", "--checkpoint", str(runs / "ar"), "--prompt", "Shall I compare thee", "--length", "24")
    cached, plain = rows(cli(*args)), rows(cli(*args, "--kv-cache", "none"))
    assert cached[0]["sampler"]["kind"] == "ar" and cached[0]["sampler"]["kv_cache"] == "prefix"
    assert cached[0]["tokens"] == plain[0]["tokens"] and cached[0]["generated_tokens"] > 10
    assert cached[0]["nfe"] == plain[0]["nfe"] == cached[0]["steps"]


def test_threshold_sampler_with_dual_cache(runs):
    out = rows(cli("sample", "--checkpoint", str(runs / "mdlm"), "--num-samples", "2", "--length", "32",
                   "--sampler", "threshold", "--threshold", "0.5", "--block-length", "8", "--kv-cache", "dual"))
    assert len(out) == 2 and all(r["nfe"] <= 31 and r["sampler"]["kv_cache"] == "dual" for r in out)


@pytest.mark.parametrize("args, says", [
    (("--prompt", "word " * 100, "--length", "16"), "sequence length is 16"),
    (("--sampler", "magic"), "kind='magic'"),
    (("--steps", "0"), "steps=0"),
    (("--sampler", "ar"), "attends both ways"),
])
def test_bad_sampling_input_is_one_clear_line(runs, args, says):
    proc = cli("sample", "--checkpoint", str(runs / "mdlm"), *args)
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_eval_writes_likelihood_samples_and_plot(runs, tmp_path):
    out = tmp_path / "eval" / "results.json"
    proc = cli("eval", "--checkpoint", str(runs / "mdlm"), "--reference", str(runs / "ar"), "--steps", "4,8",
               "--num-samples", "2", "--length", "24", "--batches", "2", "--out", str(out), "--track")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    lik = results["likelihood"]
    assert lik["tokens"] > 0 and lik["stderr"] > 0 and lik["perplexity"] == pytest.approx(2.718281828 **
                                                                                        lik["nats_per_token"])
    assert [r["steps"] for r in results["samples"]] == [4, 8]
    assert results["sampler"] == {"kind": "ancestral", "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                  "block_length": None, "threshold": 0.9, "kv_cache": "none", "cache_refresh": 0}
    assert all(r["gen_ppl"] > 1 and r["nfe"] <= r["steps"] for r in results["samples"])
    baselines = results["text_baselines"]  # held-out text and its word-shuffled copy, scored by the same judge
    assert baselines["real_text"]["gen_ppl"] > 1 and baselines["shuffled_words"]["gen_ppl"] > 1
    assert baselines["real_text"]["unigram_entropy"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("unmask-eval").experiment_id])[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "gen_ppl")] == [4, 8]
    assert "likelihood_nats_per_token" in run.data.metrics
