"""A NaN gradient with a finite loss (injected on one rank) is skipped at every ZeRO stage and in the pipeline
engine, in fp32 and bf16: every rank reports the skip, the weights after it equal those before and are finite."""

import pytest
from _parallel_common import launch, run_spec

EXPECTED = {"skipped": [False, True, False], "unchanged": True, "finite": True, "moved": True}


def _runs(parallel: dict, stages) -> list[dict]:
    return [{"name": f"zero{s}-{dtype}", "sections": {"parallel": {"engine": "deepspeed", "zero_stage": s, **parallel},
                                                      "train": {"dtype": dtype}}}
            for s in stages for dtype in ("fp32", "bf16")]


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_nan_gradient_is_skipped_and_leaves_weights_unchanged(tmp_path, layout):
    runs = _runs({}, (1, 2, 3)) if layout == "dp2" else _runs({"pp": 2}, (1,))
    got = launch("_nonfinite.py", 2, tmp_path, run_spec(runs))
    assert set(got) == {r["name"] for r in runs}
    for name, r in got.items():
        assert r == EXPECTED, name
