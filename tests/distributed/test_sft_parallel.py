"""SFT (prompt-masked batches, LLaDA's per-sample loss) trains exactly like one process at DP=2 with ZeRO-2 (with the
weight EMA) and with TP=2: the prompt mask reaches the objective in every engine and the loss stays layout-free."""

import pytest
import torch
from _parallel_common import SPECIAL, check_ema, launch, make_cfg, reference, run_spec, sft_samples

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
