"""Bad sampler input fails early with one clear line naming the value and the fix."""

import pytest
import torch

from unmask.config import ModelConfig
from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig, SamplingError, sample
from unmask.diffusion.sampler_template import infill_template, prompt_template, split_mask_spans
from unmask.errors import UnmaskError
from unmask.model.build import build_model

SP = SpecialTokens()


def raises(match):
    return pytest.raises(SamplingError, match=match)


@pytest.mark.parametrize("kw, match", [
    (dict(kind="beam"), "kind='beam' is not a sampler"),
    (dict(remasking="entropy"), "remasking='entropy'"),
    (dict(steps=0), "steps=0"),
    (dict(steps=-3), "steps=-3"),
    (dict(block_length=0), "block_length=0"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(guidance=-0.5), "guidance"),
])
def test_bad_settings(kw, match):
    with raises(match) as e:
        SamplerConfig(**kw)
    assert isinstance(e.value, UnmaskError) and "\n" not in str(e.value)


def test_prompt_longer_than_the_sequence():
    with raises("prompt 1 has 9 tokens with <bos> but the sequence length is 8"):
        prompt_template([[5, 6], list(range(5, 13))], 8, SP)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(size="tiny"))


def test_template_longer_than_the_model(tiny):
    template, _ = prompt_template([[5]], 300, SP)
    with raises("exceeds the model's max_seq_len 256"):
        sample(tiny, template, SamplerConfig(), SP)


def test_nothing_to_fill(tiny):
    template = torch.tensor([[2, 5, 6, SP.mask], [2, 5, 6, 7]])
    with raises(r"row\(s\) \[1\] have no <mask>"):
        sample(tiny, template, SamplerConfig(), SP)
    with raises("infill template 0 has no <mask> span"):
        infill_template([[[5, 6, 7]]], SP)
    with raises("spans need at least 1"):
        split_mask_spans("a <mask:0> b", 4)


def test_fewer_steps_than_blocks(tiny):
    template, _ = prompt_template([[5]], 34, SP)  # 32 masks in blocks of 8
    with raises("steps=3 is fewer than the 4 blocks"):
        sample(tiny, template, SamplerConfig(steps=3, block_length=8), SP)


def test_guidance_without_a_prompt(tiny):
    template = torch.full((1, 12), SP.mask)
    with raises("guidance needs a prompt"):
        sample(tiny, template, SamplerConfig(guidance=1.0), SP)


def test_not_a_token_matrix(tiny):
    with raises(r"\[batch, length\] int64"):
        sample(tiny, torch.full((12,), SP.mask), SamplerConfig(), SP)


def test_mask_span_syntax():
    assert split_mask_spans("The <mask:3> sat on <mask>.", 5) == ["The ", 3, " sat on ", 5, "."]
    template, prompt = infill_template([[[9], 2, [8]], [3]], SP, length=6)
    assert template.tolist() == [[2, 9, 4, 4, 8, 0], [2, 4, 4, 4, 0, 0]]
    assert prompt.tolist() == [[True, True, False, False, True, False], [True, False, False, False, False, False]]
