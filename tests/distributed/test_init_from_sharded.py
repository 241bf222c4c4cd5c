"""`--init-from` into a sharded model: each rank reads the export tensor by tensor (LazyState) and keeps its share;
the gathered weights are the folder's exactly, for tensor parallelism and for ZeRO-3, from an `unmask export` and
from a BERT masked LM."""

import pytest
from _parallel_common import launch

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("source", ["export", "bert"])
@pytest.mark.parametrize("layout", ["tp2", "zero3"])
def test_sharded_model_starts_from_the_folder_reading_each_tensor_once(tmp_path, layout, source):
    """An `unmask export` folder, and a BertForMaskedLM folder (BERT's blocks: biases sharded with their columns)."""
    r = launch("_init_from_sharded.py", 2, tmp_path, layout, *(["bert"] if source == "bert" else []))
    assert r["arch"] == ("bert" if source == "bert" else "unmask"), r
    assert r["keys"], r
    assert r["diff"] == 0.0, r
    assert r["reads"] == [r["tensors"]] * 2, r  # every rank read each tensor once, none twice
