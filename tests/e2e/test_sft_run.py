"""SFT end to end through the CLI: a run on chat shards killed with -9 resumes exactly (weights, EMA, losses and
held-out response loss), and `unmask sample --chat` answers with its chat template."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.runs import HANG_GUARD_S, metrics, tiny_cli_args, train_losses
from unmask.cli import main
from unmask.data.chat import DEFAULT_TEMPLATE

pytestmark = pytest.mark.slow

STEPS = 8
ARGS = (f"--train.steps={STEPS}", "--train.log_every=1", "--train.val_every=4", "--train.val_batches=2",
        "--train.micro_batch_size=4", "--train.seq_len=64", "--checkpoint.interval_steps=1",
        "--checkpoint.keep_last=2", "--train.threads=1", "--train.ema_decay=0.9",
        "--diffusion.prompt_conditioned=true")


@pytest.fixture(scope="module")
def sft_shards(tiny_shards, tmp_path_factory) -> Path:
    """Chat shards (seq_len 64) on the tiny tokenizer: short sums and their answers."""
    root = tmp_path_factory.mktemp("sft")
    src = root / "chats.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a + b}."}) + "\n"
                           for a in range(8) for b in range(6)))
    out = root / "data"
    assert main(["prepare-data", str(src), "--out", str(out), "--format", "chat", "--seq-len", "64",
                 "--tokenizer", str(tiny_shards / "tokenizer.model"), "--val-fraction", "0.3", "--workers", "1",
                 "--no-progress"]) == 0
    shutil.copy(tiny_shards / "tokenizer.model", out / "tokenizer.model")  # where the run's config looks for it
    return out


def run(shards: Path, run_dir: Path, faults: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "UNMASK_FAULTS": faults}
    cmd = [sys.executable, "-m", "unmask", "train", *tiny_cli_args(shards, run_dir, *ARGS)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def final(run_dir: Path) -> dict:
    step = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    return {"model": torch.load(step / "engine" / "engine.pt", weights_only=True)["model"],
            "ema": {p.name: torch.load(p, weights_only=True) for p in sorted((step / "ema").glob("*.pt"))}}


def test_sft_resumes_exactly_after_kill_9_and_answers_in_chat(sft_shards, tmp_path):
    whole = run(sft_shards, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run(sft_shards, tmp_path / "killed", "step.end@5=kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run(sft_shards, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = train_losses(tmp_path / "whole"), train_losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, STEPS + 1)) and all(a[s] == b[s] for s in a)  # bit-identical
    val = [[r for r in metrics(d) if "val_nelbo" in r] for d in (tmp_path / "whole", tmp_path / "killed")]
    fields = ("step", "val_nelbo", "val_nelbo_se", "val_tokens", "val_unigram_entropy")
    assert [r[f] for f in fields for r in val[0]] == [r[f] for f in fields for r in val[1][-len(val[0]):]]
    assert val[0][-1]["val_weights"] == "ema" and val[0][-1]["val_tokens"] > 0
    w, k = final(tmp_path / "whole"), final(tmp_path / "killed")
    assert all(torch.equal(w["model"][n], k["model"][n]) for n in w["model"])
    assert w["ema"] and w["ema"].keys() == k["ema"].keys()
    for name, saved in w["ema"].items():  # the EMA resumed exactly too
        other = k["ema"][name]["tensors"]
        assert all(torch.equal(t, other[n]) for n, t in saved["tensors"].items()), name

    out = tmp_path / "answers.jsonl"
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                                              {"role": "assistant", "content": "5."}]}) + "\n")
    assert main(["sample", "--checkpoint", str(tmp_path / "whole"), "--chat", "What is 1 plus 1?", "--chat-file",
                 str(chats), "--length", "48", "--steps", "8", "--block-length", "12", "--device", "cpu",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"User:\n{q}\n\nAssistant:\n" for q in ("What is 1 plus 1?",
                                                                                   "What is 2 plus 3?")]
    assert rows[1]["reference"] == "5." and DEFAULT_TEMPLATE.response_prefix == "Assistant:\n"
    assert all(r["sampler"]["stop_at_eos"] and len(r["tokens"]) <= 48 for r in rows)


FRESH_CHAT = """
import json, sys, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
folder, messages, tokens = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
answer = model.chat(tok, messages, max_length=64, kind="ancestral", steps=8, block_length=12, seed=0)
print(json.dumps({"text": text, "answer": answer, "expected": tok.decode(tokens, skip_special_tokens=True)}))
"""


def test_export_carries_the_chat_template_and_its_chat_answers_as_sample_does(sft_shards, tmp_path):
    """The same answer tokens as `unmask sample --chat` (compared as decoded by the export's own tokenizer)."""
    assert run(sft_shards, tmp_path / "run").returncode == 0
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "What is 3 plus 1?"}]
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": messages}) + "\n")
    answers = tmp_path / "answers.jsonl"
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--chat-file", str(chats), "--length", "64",
                 "--steps", "8", "--block-length", "12", "--device", "cpu", "--out", str(answers)]) == 0
    tokens = json.loads(answers.read_text())["tokens"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH_CHAT, str(out), json.dumps(messages), json.dumps(tokens)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["text"] == "<bos>User:\nWhat is 2 plus 2?\n\nAssistant:\n4.\n\nUser:\nWhat is 3 plus 1?\n\nAssistant:\n"
    assert got["answer"] == got["expected"]

    # `unmask eval` on the SFT split scores the held-out responses given their prompts (the demo's before/after).
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--shards", str(sft_shards / "val"), "--batches", "2",
                 "--batch-size", "4", "--steps", "4", "--num-samples", "1", "--length", "16", "--out",
                 str(report)]) == 0
    from unmask.data.loader import ShardLoader

    rows = list(ShardLoader(sft_shards / "val", 4, seq_len=64, loop=False, shuffle=False, model_vocab_size=512))[:2]
    responses = sum(int((~mask).sum()) for _, mask in rows)  # sft_eos_padding "all": every response token
    assert json.loads(report.read_text())["likelihood"]["tokens"] == responses
