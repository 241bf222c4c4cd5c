"""Two parallel axes at once on four processes: each layout trains like one process."""

import pytest
from _parallel_common import check_ema, launch, make_cfg, reference, run_spec

pytestmark = pytest.mark.distributed
STEPS = 5
EMA = {"ema_decay": 0.9}  # the weight EMA over tensor shards / stages / dp replicas, consolidated from its files

LAYOUTS = {  # name: (parallel section, per-rank micro-batch size)
    "tp2xdp2": ({"tp": 2, "zero_stage": 1}, 2),
    "pp2xdp2": ({"pp": 2, "zero_stage": 1}, 2),
    "tp2xpp2": ({"tp": 2, "pp": 2}, 4),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_four_process_layout_matches_one_process(tmp_path, name):
    parallel, mb = LAYOUTS[name]
    runs = [{"name": name, "sections": {"parallel": {"engine": "deepspeed", **parallel},
                                        "train": {"micro_batch_size": mb, **EMA}}, "steps": STEPS}]
    got = launch("_parallel_train.py", 4, tmp_path, run_spec(runs))[name]
    ref = reference(STEPS, global_micro=4, dp=4 // (parallel.get("tp", 1) * parallel.get("pp", 1)), train=EMA)
    check_ema(got, ref, tmp_path / f"ema-{name}", make_cfg(parallel={"engine": "deepspeed", **parallel}), rel=1e-4)
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["eval"] == pytest.approx(ref["eval"], rel=1e-4)
