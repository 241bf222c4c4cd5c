"""One convention for the start of a sequence: every training row opens with <bos>, where the sampler templates,
the evaluations and the AR judge put it, so nothing is ever conditioned on a token position training never saw."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from unmask.config import ModelConfig
from unmask.data.loader import ShardLoader, read_manifest
from unmask.data.prepare import PrepareOptions, prepare_data
from unmask.data.tokenizer import Tokenizer
from unmask.diffusion.autoregressive import Autoregressive
from unmask.diffusion.sampler_template import infill_template, prompt_template
from unmask.errors import DataError
from unmask.eval.genppl import UnmaskCausalLM
from unmask.model.build import build_model

TEXT = -1  # any non-special token


def rows(split) -> torch.Tensor:
    """Every sample of a split, through the loader as training reads it: [N, L]."""
    m = read_manifest(split)
    ld = ShardLoader(split, 64, seq_len=m.seq_len, model_vocab_size=m.vocab_size, loop=False, shuffle=False)
    return torch.cat(list(ld))


def kinds(ids: torch.Tensor, special, ignore=()) -> list[set[int]]:
    """Per position, the special ids seen there and TEXT for any other token: ids [N, L] -> L sets."""
    specials = {special.pad, special.unk, special.bos, special.eos, special.mask}
    return [{t if t in specials else TEXT for t in col.tolist()} - set(ignore) for col in ids.T]


def assert_seen_in_training(template: torch.Tensor, train: torch.Tensor, special, ignore=()) -> None:
    seen, asked = kinds(train, special), kinds(template, special, ignore)
    for p, want in enumerate(asked):
        assert want <= seen[p], f"position {p}: the template puts {want - seen[p]} there, training never does"


@pytest.fixture(scope="module")
def tok(tiny_shards):
    return Tokenizer(tiny_shards / "tokenizer.model")


def test_sampler_templates_put_only_what_training_puts(tiny_shards, tok):
    train, sp = rows(tiny_shards / "train"), tok.special
    length = train.shape[1]
    prompts = [tok.encode(t) for t in ("Shall I compare thee", "O", "")]
    template, _ = prompt_template(prompts, length, sp)
    # masks are the sampler's to fill (training masks every position); the rest must be positions training knows
    assert_seen_in_training(template, train, sp, ignore={sp.mask})
    assert (train[:, 0] == sp.bos).all() and int((train == sp.bos).sum()) == len(train)  # and only there
    infill, _ = infill_template([[tok.encode("To be"), 4, tok.encode("not to be")], [3, tok.encode(" sweet")]], sp,
                                length=length)
    assert_seen_in_training(infill, train, sp, ignore={sp.mask, sp.pad})  # pad: never attended to as text


def test_the_ar_judge_prefix_is_what_ar_training_conditions_on(tiny_shards, tok):
    train, sp = rows(tiny_shards / "train"), tok.special
    inputs = Autoregressive(sp.pad).corrupt(train).inputs[0]  # what the causal model is trained to read
    judge = UnmaskCausalLM(build_model(ModelConfig(size="tiny"), causal=True), tok.encode, sp.bos, sp.pad)
    ids = judge.encode("Shall I compare thee to a summer's day?")
    assert ids[0] == sp.bos
    assert_seen_in_training(torch.tensor([ids]), inputs, sp)


def old_format(split) -> None:
    """Rewrite a split's manifest as the unmask before the <bos> row prefix wrote it."""
    d = json.loads((split / "manifest.json").read_text())
    d.pop("row_prefix")
    d["format"] = "unmask-shards/1"
    (split / "manifest.json").write_text(json.dumps(d, indent=1))


def test_shards_of_the_older_format_are_refused_in_one_line(tiny_shards, tmp_path):
    split = tmp_path / "data" / "train"
    shutil.copytree(tiny_shards, tmp_path / "data")
    old_format(split)
    with pytest.raises(DataError) as e:
        ShardLoader(split, 8, seq_len=128, model_vocab_size=512)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(split) in msg
    assert "do not begin with <bos>" in msg and "re-run `unmask prepare-data`" in msg


def test_re_running_prepare_data_rewrites_older_shards_with_the_same_tokenizer(tiny_shards, tiny_corpus, tmp_path):
    opts = PrepareOptions(inputs=[str(p) for p in tiny_corpus[1:3]], out=tmp_path / "o", seq_len=32,
                          tokenizer=tiny_shards / "tokenizer.model", val_fraction=0, workers=1, progress=False)
    new = prepare_data(opts).train
    state = opts.out / ".prepare-data.json"
    settings = json.loads(state.read_text())
    del settings["format"]  # the older unmask did not record it
    state.write_text(json.dumps(settings))
    for split in ("train", "val"):
        old_format(opts.out / split)
    with pytest.raises(DataError, match="re-run `unmask prepare-data`"):
        read_manifest(opts.out / "train")
    again = prepare_data(opts)
    assert not again.already_complete and again.train == new
    assert np.array_equal(rows(opts.out / "train")[:, 0], np.full(new.num_samples, Tokenizer(
        opts.out / "tokenizer.model").special.bos))
