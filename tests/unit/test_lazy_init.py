"""`--init-from` an `unmask export` reads the folder lazily: nothing is read before construction, construction reads
each stored tensor once, and the weights equal those of the eager read (the whole file in memory)."""

import json
from collections.abc import Mapping

import pytest
import torch
from safetensors.torch import load_file, save_file

from unmask.config import Config
from unmask.data.special import SpecialTokens
from unmask.engines.build import build_sharded_model
from unmask.export.hf import write_model
from unmask.model.build import build_model, materialize
from unmask.model.hf.adapter import from_hf
from unmask.model.hf.init import init_from, with_model
from unmask.model.hf.lazy import LazyState, load_into
from unmask.parallel.dims import ParallelDims

SPECIAL = SpecialTokens(pad=0, unk=1, bos=2, eos=3, mask=4)
VARIANTS = [{}, {"tie_embeddings": True}, {"arch": "bert", "n_kv_heads": None, "tie_embeddings": True}]


def exported(tmp_path, variant: dict):
    cfg = Config.model_validate({"model": {"size": "tiny", **variant}, "train": {"seq_len": 64},
                                 "data": {"train_dir": str(tmp_path / "nowhere")}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # every weight random: a swapped or default-initialised one shows
        for p in model.parameters():
            p.normal_(std=0.2)
    folder = tmp_path / "hf"
    folder.mkdir()
    write_model(folder, cfg, model.state_dict(), SPECIAL)
    return cfg, folder


@pytest.fixture
def reads(monkeypatch):
    """The plain keys LazyState reads, in order."""
    keys = []
    getitem = LazyState.__getitem__

    def counting(self, key):
        keys.append(key)
        return getitem(self, key)

    monkeypatch.setattr(LazyState, "__getitem__", counting)
    return keys


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_from_reads_nothing_then_each_tensor_once_and_equals_the_eager_read(tmp_path, variant, reads):
    cfg, folder = exported(tmp_path, variant)
    state, fields = init_from(folder, cfg)
    assert isinstance(state, Mapping) and not isinstance(state, dict)
    assert reads == [] and state.reads == 0
    cfg = with_model(cfg, fields)
    eager = from_hf({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()},
                    cfg.model.tie_embeddings)  # what --init-from read before: the whole file at once
    assert set(state) == set(eager) and all(state.shape(k) == list(eager[k].shape) for k in eager)
    assert reads == []  # keys, membership and shapes come from the header

    model = build_sharded_model(cfg, ParallelDims(), torch.device("cpu"), state)
    assert sorted(reads) == sorted(set(reads)), "a tensor was read twice"
    assert len(reads) == len({id(p) for p in model.parameters()})  # a tied weight is one parameter, read once
    got = model.state_dict()
    assert got.keys() == eager.keys()
    assert all(torch.equal(got[k], eager[k]) for k in eager)


def test_an_export_in_several_files_reads_through_the_index(tmp_path, reads):
    cfg, folder = exported(tmp_path, {})
    whole = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(whole)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in parts.items():
        save_file({k: whole[k] for k in part}, str(folder / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in parts.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    state, fields = init_from(folder, cfg)
    model = build_sharded_model(with_model(cfg, fields), ParallelDims(), torch.device("cpu"), state)
    assert len(reads) == len(keys)
    got = model.state_dict()
    assert all(torch.equal(got[k], whole["model." + k]) for k in got)


def test_load_into_a_lazy_state_errs_as_load_state_dict(tmp_path):
    cfg, folder = exported(tmp_path, {})
    state, fields = init_from(folder, cfg)
    cfg = with_model(cfg, fields)
    sources = dict(state.sources)
    sources.pop("norm.weight")
    sources["extra.weight"] = sources["tok_embeddings.weight"]
    bad = LazyState(sources)
    with pytest.raises(RuntimeError) as ours:
        load_into(build_model(cfg.model), bad)
    assert bad.reads == 0  # the keys are checked before anything is read
    with pytest.raises(RuntimeError) as torchs:
        build_model(cfg.model).load_state_dict({k: bad[k] for k in bad})
    assert str(ours.value) == str(torchs.value)
    assert "Missing key(s) in state_dict: \"norm.weight\"" in str(ours.value) and "extra.weight" in str(ours.value)
    sources["norm.weight"] = sources["tok_embeddings.weight"]
    with pytest.raises(RuntimeError, match="size mismatch for norm.weight"):
        load_into(build_model(cfg.model), LazyState({k: v for k, v in sources.items() if k != "extra.weight"}))

    model = load_into(build_model(cfg.model), state)  # and a good one loads, one tensor at a time
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(KeyError, match="initial weights have no 'norm.weight'"):
        materialize(build_model(cfg.model, device="meta"), "cpu", lambda *a: None, 0,
                    source=LazyState({k: v for k, v in sources.items() if k != "norm.weight"}))


def test_sampling_loads_an_export_lazily(tmp_path, reads):
    from tokenizers import Tokenizer, models

    from unmask.inference import load

    cfg, folder = exported(tmp_path, {"tie_embeddings": True})
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    loaded = load(folder)
    assert len(reads) == len({id(p) for p in loaded.model.parameters()})
    whole = load_file(str(folder / "model.safetensors"))
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], whole["model." + k]) for k in got if k != "output.weight")
