"""The exported folder's code is unmask.core byte for byte (and imports nothing else), the exported classes
compute unmask's logits (both architecture families), and the key map is exact."""

import ast
import inspect

import pytest
import torch
from transformers.dynamic_module_utils import get_relative_import_files

from unmask.config import Config
from unmask.core import sampling
from unmask.data.special import SpecialTokens
from unmask.diffusion import sampler
from unmask.export.hf import AUTO_MAP, CODE_FILES, CORE, hf_model, write_model
from unmask.model.build import build_model
from unmask.model.hf.adapter import from_hf, to_hf

VARIANTS = [{}, {"tie_embeddings": True}, {"time_conditioning": True}, {"n_kv_heads": 1},
            {"arch": "bert", "n_kv_heads": None}, {"arch": "bert", "n_kv_heads": None, "tie_embeddings": True}]


def random_model(variant: dict, objective: str = "mdlm", schedule: str = "loglinear"):
    cfg = Config.model_validate({"model": {"size": "tiny", **variant}, "train": {"seq_len": 64},
                                 "diffusion": {"objective": objective, "schedule": schedule}})
    torch.manual_seed(0)
    model = build_model(cfg.model, causal=objective == "ar").eval()
    with torch.no_grad():  # every weight random: zero-initialised adaLN or norms would hide mistakes
        for p in model.parameters():
            p.normal_(std=0.2 if p.ndim > 1 else 1.0)
    return cfg, model


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_logits_equal_unmask(variant):
    cfg, model = random_model(variant)
    hf = hf_model(cfg, model.state_dict(), SpecialTokens())
    x = torch.randint(0, cfg.model.vocab_size, (2, 48))
    t = torch.rand(2)
    ours = model(x, t) if cfg.model.time_conditioning else model(x)
    torch.testing.assert_close(hf(x, t=t).logits, ours, atol=1e-5, rtol=0)
    if cfg.model.tie_embeddings:
        assert hf.model.output.weight is hf.model.tok_embeddings.weight


def test_causal_baseline_exports_causal_attention():
    cfg, model = random_model({}, objective="ar")
    hf = hf_model(cfg, model.state_dict(), SpecialTokens())
    x = torch.randint(0, cfg.model.vocab_size, (1, 32))
    torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_key_map_round_trip(variant):
    cfg, model = random_model(variant)
    state = model.state_dict()
    hf_state = to_hf(state, cfg.model.tie_embeddings)
    assert set(hf_state) == {"model." + k for k in state} - ({"model.output.weight"} if cfg.model.tie_embeddings
                                                            else set())  # a tied output is stored once
    back = from_hf(hf_state, cfg.model.tie_embeddings)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_hf_model_refuses_an_attention_mask_with_padding():
    cfg, model = random_model({})
    hf = hf_model(cfg, model.state_dict(), SpecialTokens())
    x = torch.randint(0, cfg.model.vocab_size, (1, 8))
    torch.testing.assert_close(hf(x, attention_mask=torch.ones_like(x)).logits, model(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attend to every position"):
        hf(x, attention_mask=torch.zeros_like(x))


def test_from_hf_reads_folders_exported_before_the_core_wrapper():
    """Those stored output.* as lm_head.* and the bert MLM transform as head.*, outside model.*."""
    cfg, model = random_model({"arch": "bert", "n_kv_heads": None})
    state = model.state_dict()
    old = {("lm_head." + k.removeprefix("output.") if k.startswith("output.") else
            k if k.startswith("head.") else "model." + k): v for k, v in state.items()}
    back = from_hf(old, tied=False)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_exported_code_is_unmask_core_byte_for_byte(tmp_path):
    cfg, model = random_model({})
    write_model(tmp_path, cfg, model.state_dict(), SpecialTokens())
    exported = {p.name for p in tmp_path.glob("*.py")}
    assert exported == set(CODE_FILES) == {p.name for p in CORE.glob("*.py")} - {"__init__.py"}
    assert all((tmp_path / name).read_bytes() == (CORE / name).read_bytes() for name in exported)
    # Everything the auto_map classes import (transformers follows relative imports, transitively) is exported.
    for entry in AUTO_MAP.values():
        needed = get_relative_import_files(tmp_path / (entry.split(".")[0] + ".py"))
        assert {p.rsplit("/", 1)[-1] for p in map(str, needed)} <= exported
    # ... and they are the files unmask itself trains and samples with.
    assert inspect.getfile(type(model)) == str(CORE / "transformer.py")
    assert inspect.getfile(sampling) == str(CORE / "sampling.py") and sampler.generate is sampling.generate


@pytest.mark.parametrize("name", CODE_FILES)
def test_core_files_import_only_torch_transformers_and_each_other(name):
    allowed = {"__future__", "math", "dataclasses", "torch", "transformers"}
    for node in ast.walk(ast.parse((CORE / name).read_text())):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots = {node.module.split(".")[0]}
        else:
            continue
        assert roots <= allowed, f"{name}:{node.lineno} imports {roots - allowed}: the export would need them"
