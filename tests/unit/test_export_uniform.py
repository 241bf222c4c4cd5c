"""A uniform-state (duo) export: config.json says diffusion_process "uniform", and the folder samples like unmask:
through transformers alone (fresh interpreter, trust_remote_code), in process, and through `unmask sample` on the
folder, the same tokens for the same seed. The run config says "duo" by a copy that skips validation, so these tests
do not need the objective itself."""

import argparse
import json

import pytest
import torch

from tests.support.fresh_hf import run_fresh
from tests.unit.test_export_hf import random_model
from unmask.core.configuration_unmask import UnmaskConfig
from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig, sample
from unmask.diffusion.sampler_template import infill_template, prompt_template
from unmask.errors import CheckpointError
from unmask.export.hf import hf_config, hf_model, write_model

SP = SpecialTokens()
OPTIONS = [
    dict(steps=8),
    dict(steps=5, noise_removal="ancestral", top_p=0.9, temperature=0.8, seed=3),
    dict(steps=3, top_k=20, seed=1),
    dict(steps=4, noise_removal="ancestral", stop_at_eos=True, seed=2),
]

pytestmark = pytest.mark.usefixtures("one_thread")


def duo_model():
    cfg, model = random_model({"time_conditioning": True})
    diffusion = cfg.diffusion.model_copy(update={"objective": "duo"})  # no validation: the literal may not exist
    with torch.no_grad():  # make <eos> likely somewhere, so stop_at_eos has something to cut at
        model.output.weight[SP.eos] *= 3
    return cfg.model_copy(update={"diffusion": diffusion}), model


def templates():
    prompts, _ = prompt_template([[10, 11, 12], [40, 41]], 32, SP)
    infill, _ = infill_template([[[10, 11, 12], 6, [20, 21], 9, [30, 31]], [[40], 12, [41]]], SP)
    return [prompts, infill]


def test_the_config_says_which_process_and_old_exports_read_as_masked():
    cfg, _ = duo_model()
    assert hf_config(cfg, SP).diffusion_process == "uniform"
    masked, _ = random_model({"time_conditioning": True})
    assert hf_config(masked, SP).diffusion_process == "masked"
    old = UnmaskConfig.from_dict({k: v for k, v in hf_config(masked, SP).to_dict().items()
                                  if k != "diffusion_process"})
    assert old.diffusion_process == "masked"
    with pytest.raises(CheckpointError, match="sampler kind 'remask' does not decode a uniform-state"):
        hf_config(cfg, SP, sampler={"kind": "remask"})
    with pytest.raises(CheckpointError, match="noise_removal is the last step of a uniform-state"):
        hf_config(masked, SP, sampler={"noise_removal": "greedy"})


def test_transformers_alone_samples_a_uniform_export_like_unmask(tmp_path):
    cfg, model = duo_model()
    (tmp_path / "duo").mkdir()
    write_model(tmp_path / "duo", cfg, model.state_dict(), SP)
    assert json.loads((tmp_path / "duo" / "config.json").read_text())["diffusion_process"] == "uniform"
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    job = {"folder": str(tmp_path / "duo"), "tokens": tokens, "t": torch.rand(2), "templates": templates(),
           "options": OPTIONS}
    (got,) = run_fresh([job], tmp_path)
    for options, rows in zip(OPTIONS, got["samples"], strict=True):
        for template, out in zip(templates(), rows, strict=True):
            ours = sample(model, template, SamplerConfig(**options), SP, process="uniform")
            assert torch.equal(out["sequences"], ours.tokens) and torch.equal(out["lengths"], ours.lengths), options
            assert (out["nfe"], out["steps"]) == (ours.nfe, ours.steps) == (options["steps"] + 1, options["steps"])
    masked = sample(model, templates()[0], SamplerConfig(steps=8), SP)  # the process matters: not the same sampler
    assert not torch.equal(got["samples"][0][0]["sequences"], masked.tokens)


def test_in_process_export_and_config_defaults():
    cfg, model = duo_model()
    hf = hf_model(cfg, model.state_dict(), SP)
    hf.config.sampler = {"steps": 6, "noise_removal": "ancestral"}
    prompt = torch.tensor([[SP.bos, 10, 11]])
    out = hf.diffusion_generate(prompt, max_length=24, seed=5)
    template, _ = prompt_template([[10, 11]], 24, SP)
    ours = sample(model, template, SamplerConfig(steps=6, noise_removal="ancestral", seed=5), SP, process="uniform")
    assert torch.equal(out["sequences"], ours.tokens) and out["nfe"] == 7
    with pytest.raises(ValueError, match="kind='remask' decodes a masked-diffusion model"):
        hf.diffusion_generate(prompt, max_length=24, kind="remask")


def word_tokenizer(folder, vocab_size: int) -> None:
    """A word-level tokenizer.json over the model's ids (w0 w1 ...), so the folder loads as unmask's Codec."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A uniform-state export with a tokenizer: what `unmask sample` and `unmask eval` load."""
    cfg, model = duo_model()
    folder = tmp_path_factory.mktemp("duo-export")
    write_model(folder, cfg, model.state_dict(), SP)
    word_tokenizer(folder, cfg.model.vocab_size)
    return folder


def parse(add_arguments, argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_unmask_sample_on_a_uniform_export_gives_diffusion_generate_tokens(folder, tmp_path):
    from unmask.diffusion.cli import add_arguments, run
    from unmask.inference import load

    cfg, model = duo_model()
    loaded = load(folder)
    assert (loaded.objective, loaded.process) == ("duo", "uniform")
    out = tmp_path / "samples.jsonl"
    run(parse(add_arguments, ["--checkpoint", str(folder), "--num-samples", "2", "--length", "24", "--steps", "5",
                              "--seed", "7", "--device", "cpu", "--out", str(out)]))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["nfe"] for r in rows] == [6, 6] and rows[0]["sampler"]["noise_removal"] == "greedy"
    template, _ = prompt_template([[], []], 24, SP)
    hf = hf_model(cfg, model.state_dict(), SP)
    sequences = hf.diffusion_generate(template=template, steps=5, seed=7)["sequences"]
    drop = {SP.bos, SP.eos, SP.pad}
    assert [r["tokens"] for r in rows] == [[t for t in row.tolist() if t not in drop] for row in sequences]


def test_unmask_eval_samples_a_uniform_export_with_its_sampler(folder, tmp_path):
    from unmask.eval.cli import add_arguments, run

    out = tmp_path / "eval.json"
    run(parse(add_arguments, ["--checkpoint", str(folder), "--steps", "2,4", "--num-samples", "2", "--length", "16",
                              "--noise-removal", "ancestral", "--device", "cpu", "--out", str(out)]))
    results = json.loads(out.read_text())
    assert results["objective"] == "duo" and results["sampler"]["noise_removal"] == "ancestral"
    assert [r["nfe"] for r in results["samples"]] == [3, 5]  # steps + the noise removal
