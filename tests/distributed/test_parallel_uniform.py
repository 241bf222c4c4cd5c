"""Uniform-state diffusion (Duo) on every parallel axis: the vocab-parallel NELBO reductions and soft-input
embedding under tensor parallelism, float first-stage inputs through pipeline stages, and ZeRO-3 data parallelism
train exactly as in one process, with Duo's curriculum on for the first steps and the true ELBO after."""

import pytest
from _parallel_common import launch, reference, run_spec

pytestmark = pytest.mark.distributed
STEPS = 5
DUO = {"objective": "duo", "curriculum_start": 1, "curriculum_end": 3}  # steps 0-2 curriculum, 3-4 the plain ELBO
MODEL = {"time_conditioning": True}

LAYOUTS = {  # name: (parallel section, per-rank micro-batch size, data-parallel size)
    "tp2": ({"tp": 2}, 4, 1),
    "pp2": ({"pp": 2, "zero_stage": 1}, 4, 1),
    "dp2-zero3": ({"zero_stage": 3}, 2, 2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_uniform_diffusion_layout_matches_one_process(tmp_path, name):
    parallel, mb, dp = LAYOUTS[name]
    runs = [{"name": name, "sections": {"parallel": {"engine": "deepspeed", **parallel}, "diffusion": DUO,
                                        "model": MODEL, "train": {"micro_batch_size": mb}}, "steps": STEPS}]
    got = launch("_parallel_train.py", 2, tmp_path, run_spec(runs))[name]
    ref = reference(STEPS, global_micro=4, dp=dp, diffusion=DUO, model=MODEL)
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["eval"] == pytest.approx(ref["eval"], rel=1e-4)
