"""AR -> diffusion adaptation (issue 16) trains exactly like one process at DP=2 with ZeRO-2 and at TP=2: Dream's
shifted logits and DiffuLLaMA's annealed attention mask, drawn from (seed, step) alone, are the same on every rank,
and the tensor-parallel model takes the mask as the plain one does. Random init: the layout is what is checked here;
--init-from is tests/e2e/test_adaptation_run.py's."""

import pytest
from _parallel_common import launch, reference, run_spec

pytestmark = pytest.mark.distributed
STEPS, ANNEAL = 6, 4  # steps 0-3 annealed, 4-5 fully attending
ADAPT = {"model": {"shift_logits": True}, "diffusion": {"anneal_steps": ANNEAL}}


def check(got: dict, ref: dict) -> None:
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["eval"] == pytest.approx(ref["eval"], rel=1e-4)


def test_adaptation_dp2_zero2_matches_one_process(tmp_path):
    runs = [{"name": "zero2", "sections": {"parallel": {"engine": "deepspeed", "zero_stage": 2}, **ADAPT},
             "steps": STEPS}]
    got = launch("_parallel_train.py", 2, tmp_path, run_spec(runs))["zero2"]
    ref = reference(STEPS, global_micro=4, dp=2, **ADAPT)
    check(got, ref)
    full = reference(STEPS, global_micro=4, dp=2, model={"shift_logits": True})
    assert abs(full["loss"][1] - ref["loss"][1]) > 1e-4  # the annealed mask reached the blocks: the check can fail


def test_adaptation_tp2_matches_one_process(tmp_path):
    runs = [{"name": "tp2", "sections": {"parallel": {"engine": "deepspeed", "tp": 2}, **ADAPT}, "steps": STEPS}]
    got = launch("_parallel_train.py", 2, tmp_path, run_spec(runs))["tp2"]
    check(got, reference(STEPS, global_micro=2, dp=1, **ADAPT))
