"""SFT (prompt-masked batches, LLaDA's per-sample loss) trains exactly like one process at DP=2 with ZeRO-2 (with the
weight EMA), with TP=2 and with PP=2: the prompt mask reaches the objective in every engine and the loss stays
layout-free."""

import json
import os
import subprocess
import sys

import pytest
import torch
from _parallel_common import SPECIAL, check_ema, launch, make_cfg, reference, run_spec, sft_samples

from tests.support.runs import HANG_GUARD_S, REPO, tiny_cli_args, train_losses
from unmask.cli import main

pytestmark = pytest.mark.distributed
STEPS = 6
SFT = {"diffusion": {"prompt_conditioned": True}}
EMA = {"ema_decay": 0.9}


def counted_eval_tokens(padding: str) -> int:
    """The response tokens `evaluate` scores: its held-out samples' answers, with their <eos> padding as configured."""
    cfg = make_cfg()
    x0 = torch.randint(5, cfg.model.vocab_size, (8, cfg.train.seq_len), generator=torch.Generator().manual_seed(7))
    tokens, prompt = sft_samples(x0, 7)
    eos = (tokens == SPECIAL.eos) & ~prompt
    return int({"all": ~prompt, "first": ~prompt & (eos.cumsum(1) - eos.long() == 0)}[padding].sum())


def check(got: dict, ref: dict, padding: str = "all") -> None:
    assert got["eval"][1] == counted_eval_tokens(padding)  # the prompt mask reached the parallel engine
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["eval"] == pytest.approx(ref["eval"], rel=1e-4)  # held-out response nll and counted tokens


def test_sft_dp2_zero2_with_ema_matches_one_process(tmp_path):
    parallel = {"engine": "deepspeed", "zero_stage": 2}
    runs = [{"name": "zero2", "sections": {"parallel": parallel, "train": EMA, **SFT}, "steps": STEPS}]
    got = launch("_parallel_train.py", 2, tmp_path, run_spec(runs))["zero2"]
    ref = reference(STEPS, global_micro=4, dp=2, train=EMA, **SFT)
    check(got, ref)
    check_ema(got, ref, tmp_path / "ema-zero2", make_cfg(parallel=parallel, train=EMA, **SFT))


@pytest.mark.parametrize("padding", ["first"])
def test_sft_tp2_matches_one_process(tmp_path, padding):
    sft = {"diffusion": {"prompt_conditioned": True, "sft_eos_padding": padding}}
    runs = [{"name": "tp2", "sections": {"parallel": {"engine": "deepspeed", "tp": 2}, **sft}, "steps": STEPS}]
    got = launch("_parallel_train.py", 2, tmp_path, run_spec(runs))["tp2"]
    check(got, reference(STEPS, global_micro=2, dp=1, **sft), padding)


def test_sft_pp2_matches_one_process(tmp_path):
    """Pipeline stages: every stage corrupts with the same prompt mask; the last one scores the responses."""
    runs = [{"name": "pp2", "sections": {"parallel": {"engine": "deepspeed", "pp": 2, "zero_stage": 1},
                                         "train": {"micro_batch_size": 4}, **SFT}, "steps": STEPS}]
    got = launch("_parallel_train.py", 2, tmp_path, run_spec(runs))["pp2"]
    check(got, reference(STEPS, global_micro=4, dp=1, **SFT))


def test_sft_tp2_through_the_train_loop_matches_one_process(tiny_shards, tmp_path):
    """The loop's tensor-parallel batch sharing (one reader per group) hands the peer the prompt masks too."""
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a + b}."}) + "\n"
                           for a in range(6) for b in range(4)))
    data = tmp_path / "data"
    assert main(["prepare-data", str(src), "--out", str(data), "--format", "chat", "--seq-len", "64", "--tokenizer",
                 str(tiny_shards / "tokenizer.model"), "--val-fraction", "0.2", "--workers", "1", "--no-progress"]) == 0
    (data / "tokenizer.model").write_bytes((tiny_shards / "tokenizer.model").read_bytes())
    common = ("--train.steps=3", "--train.log_every=1", "--train.val_every=0", "--train.micro_batch_size=4",
              "--train.seq_len=64", "--train.threads=1", "--diffusion.prompt_conditioned=true")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unmask",
           "train", *tiny_cli_args(data, tmp_path / "tp2", *common, "--parallel.engine=deepspeed", "--parallel.tp=2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert main(["train", *tiny_cli_args(data, tmp_path / "one", *common)]) == 0
    tp2, one = train_losses(tmp_path / "tp2"), train_losses(tmp_path / "one")
    assert sorted(tp2) == [1, 2, 3] and [tp2[s] for s in tp2] == pytest.approx([one[s] for s in tp2], abs=1e-5)
