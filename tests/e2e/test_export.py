"""Train a tiny model -> `unmask export` -> load it with transformers alone; errors leave nothing half-written;
export -> init_from -> one training step equals one step from the checkpoint's own weights."""

import itertools
import json
import math
import shutil

import pytest
import torch

from tests.support.fresh_hf import run_fresh
from tests.support.runs import tiny_cli_args, tiny_config
from unmask.checkpoint.consolidate import load_checkpoint_weights, load_model
from unmask.cli import main
from unmask.data.special import SpecialTokens
from unmask.data.tokenizer import Tokenizer
from unmask.diffusion.sampler import SamplerConfig, sample
from unmask.diffusion.sampler_template import prompt_template
from unmask.engines import build_components
from unmask.errors import CheckpointError
from unmask.export.hf import CODE_FILES, CORE, export
from unmask.model.hf.init import init_from, with_model
from unmask.parallel.dims import ParallelDims
from unmask.train.loop import make_loader, step_keys, train

pytestmark = pytest.mark.slow
FAST = ("--train.steps=4", "--train.log_every=1", "--train.val_every=2", "--train.val_batches=1",
        "--train.micro_batch_size=4", "--checkpoint.interval_steps=2", "--train.threads=1")
TEXTS = ["Shall I compare thee to a summer's day?", "  Thou art more lovely\nand more temperate:  ",
         "Rough winds do shake the darling buds of May <mask> é ∑ 🌹"]
OPTIONS = [dict(kind="ancestral", steps=16, seed=3), dict(kind="remask", steps=12, block_length=8, seed=1),
           dict(kind="ancestral", steps=24, top_p=0.9, temperature=0.7, stop_at_eos=True, seed=7)]

@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(tiny_shards, run_dir, *FAST))
    return run_dir


def test_export_loads_in_transformers_alone_with_equal_logits_samples_and_ids(trained, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(trained), "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "modeling_unmask.py", "configuration_unmask.py", "tokenizer.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    assert all((out / name).read_bytes() == (CORE / name).read_bytes() for name in CODE_FILES)  # unmask's own code
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM"}
    assert "validation NELBO" in (out / "README.md").read_text()

    cfg, model, special, tokenizer_path = load_model(trained)
    tok = Tokenizer(tokenizer_path)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    template, _ = prompt_template([tok.encode(TEXTS[0]), tok.encode("Rough winds")], 48, special)
    got = run_fresh([{"folder": str(out), "tokens": tokens, "t": None, "templates": [template], "options": OPTIONS,
                      "texts": TEXTS}], tmp_path)[0]

    assert (got["config"], got["base"]) == ("UnmaskConfig", "UnmaskModel")
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(tokens), atol=1e-5, rtol=0)
    for options, (hf,) in zip(OPTIONS, got["samples"], strict=True):
        ours = sample(model, template, SamplerConfig(**options), special, schedule=cfg.diffusion.schedule)
        assert torch.equal(hf["sequences"], ours.tokens) and torch.equal(hf["lengths"], ours.lengths), options
    assert got["ids"] == [tok.encode(t) for t in TEXTS]


def test_init_from_an_export_then_one_step_equals_one_step_from_the_checkpoint(trained, tiny_shards, tmp_path):
    export(trained, tmp_path / "hf")
    cfg = tiny_config(tiny_shards, tmp_path / "new", *FAST, "--train.steps=1")
    state, fields = init_from(tmp_path / "hf", cfg)
    cfg = with_model(cfg, fields)
    assert cfg.model == load_checkpoint_weights(trained)[0].model.model_copy(update={"size": None})

    def one_step(weights):
        torch.manual_seed(cfg.train.seed)
        loader = make_loader(cfg, ParallelDims(), cfg.data.train_dir, loop=True)
        parts = build_components(cfg, ParallelDims(), torch.device("cpu"), loader.manifest.special, init_state=weights)
        stats = parts.engine.train_step(list(itertools.islice(iter(loader), cfg.train.grad_accum)),
                                        step_keys(cfg, ParallelDims(), 0))
        return stats.loss, parts.model.state_dict()

    loss_a, after_a = one_step(state)
    loss_b, after_b = one_step(load_checkpoint_weights(trained)[1])
    assert loss_a == loss_b
    assert all(torch.equal(after_a[k], after_b[k]) for k in after_b)


def test_train_cli_init_from(trained, tiny_shards, tmp_path):
    """Through `unmask train --init-from`."""
    export(trained, tmp_path / "hf")
    run_dir = tmp_path / "new"
    args = tiny_cli_args(tiny_shards, run_dir, *FAST, "--train.steps=1", "--checkpoint.interval_steps=1")
    assert main(["train", *args, "--init-from", str(tmp_path / "hf")]) == 0
    _, after = load_checkpoint_weights(run_dir)
    _, before = load_checkpoint_weights(trained)
    assert after.keys() == before.keys()
    # One small step away from the exported weights, far closer than to a fresh initialisation.
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 0.01


def damaged_copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    engine = run / "checkpoints" / "step-00000004" / "engine" / "engine.pt"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    return run


def test_missing_or_corrupted_checkpoint_is_one_clear_error_and_writes_nothing(trained, tmp_path, capsys):
    out = tmp_path / "out" / "hf"
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        export(tmp_path / "nowhere", out)
    run = damaged_copy(trained, tmp_path)
    with pytest.raises(CheckpointError, match="step-00000004 is unusable: engine/engine.pt does not match its sha256"):
        export(run / "checkpoints" / "step-00000004", out)
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "step-00000004"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unmask export: error: checkpoint") and "\n" not in err
    assert not out.exists() and not list(tmp_path.rglob(".tmp-export-*"))
    # A run dir falls back to its newest checkpoint that verifies, with a warning.
    with pytest.warns(UserWarning, match="step-00000004 is unusable"):
        export(run, out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "unmask"
    assert "from `" + str(run / "checkpoints" / "step-00000002") in (out / "README.md").read_text()


def test_out_is_never_overwritten_without_force(trained, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="exists and is not an empty folder; pass --force"):
        export(trained, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    export(trained, out, force=True, dtype="bf16")
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp or moved-aside folders left


def save_bert_like_unmask_vocab(folder):
    """A tiny random BertForMaskedLM whose special ids are unmask's (pad 0, unk 1, cls 2, sep 3, mask 4), as a
    BERT re-tokenised for the tiny shards would be."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    config.unk_token_id, config.cls_token_id, config.sep_token_id, config.mask_token_id = 1, 2, 3, 4
    BertForMaskedLM(config).save_pretrained(folder)


def test_imported_bert_trains_with_the_diffusion_objective(tiny_shards, tmp_path):
    save_bert_like_unmask_vocab(tmp_path / "bert")
    cfg = tiny_config(tiny_shards, tmp_path / "run", *FAST)
    state, fields = init_from(tmp_path / "bert", cfg)
    cfg = with_model(cfg, fields)
    torch.manual_seed(0)
    loader = make_loader(cfg, ParallelDims(), cfg.data.train_dir, loop=True)
    engine = build_components(cfg, ParallelDims(), torch.device("cpu"), SpecialTokens(), init_state=state).engine
    batch = next(iter(loader))
    losses = [engine.train_step([batch], step_keys(cfg, ParallelDims(), 0)).loss for _ in range(8)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]  # same batch and noise: it fits


def test_train_cli_init_from_bert(tiny_shards, tmp_path):
    save_bert_like_unmask_vocab(tmp_path / "bert")
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_cli_args(tiny_shards, run_dir, *FAST), "--init-from", str(tmp_path / "bert")]) == 0
    cfg, state = load_checkpoint_weights(run_dir)
    assert cfg.model.arch == "bert" and cfg.model.dim == 32
    export(run_dir, tmp_path / "hf")  # a BERT-family diffusion LM exports like any other
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["arch"] == "bert"
