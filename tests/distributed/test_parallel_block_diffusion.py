"""Block diffusion (BD3-LM) on every parallel axis: its vectorised [x_t | x_0] pass trains under tensor parallelism,
pipeline stages and ZeRO-3 data parallelism exactly as in one process."""

import pytest
from _parallel_common import launch, reference, run_spec

pytestmark = pytest.mark.distributed
STEPS = 4
BD3 = {"objective": "bd3lm", "block_size": 8}

LAYOUTS = {  # name: (parallel section, per-rank micro-batch size, data-parallel size)
    "tp2": ({"tp": 2}, 4, 1),
    "pp2": ({"pp": 2, "zero_stage": 1}, 4, 1),
    "dp2-zero3": ({"zero_stage": 3}, 2, 2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_block_diffusion_layout_matches_one_process(tmp_path, name):
    parallel, mb, dp = LAYOUTS[name]
    runs = [{"name": name, "sections": {"parallel": {"engine": "deepspeed", **parallel}, "diffusion": BD3,
                                        "train": {"micro_batch_size": mb}}, "steps": STEPS}]
    got = launch("_parallel_train.py", 2, tmp_path, run_spec(runs))[name]
    ref = reference(STEPS, global_micro=4, dp=dp, diffusion=BD3)
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["eval"] == pytest.approx(ref["eval"], rel=1e-4)
