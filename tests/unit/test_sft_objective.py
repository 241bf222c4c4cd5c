"""The SFT objective on hand-built samples: prompts are never masked nor scored, the <eos> padding is scored
exactly as `diffusion.sft_eos_padding` says, and the loss is LLaDA's (per sample by its answer length, then the
mean over samples)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unmask.config import Config, DiffusionConfig
from unmask.data.special import SpecialTokens
from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import MaskedDiffusion
from unmask.errors import ConfigError
from unmask.train.validation import check_sft_split

pytestmark = pytest.mark.usefixtures("one_thread")

SP = SpecialTokens()  # pad 0, bos 2, eos 3, mask 4
V = 32
# (prompt tokens after <bos>, answer text): each sample is <bos> prompt answer <eos> ... <eos> to L tokens.
SAMPLES = [([10, 11, 12], [20, 21]), ([13], [22, 23, 24, 25, 26]), ([14, 15, 16, 17, 18, 19], [27]),
           ([9, 8], [28, 29, 30])]
L = 12


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    rows, masks = [], []
    for prompt, answer in SAMPLES:
        row = [SP.bos, *prompt, *answer]
        masks.append([True] * (1 + len(prompt)) + [False] * (L - 1 - len(prompt)))
        rows.append(row + [SP.eos] * (L - len(row)))
    return torch.tensor(rows), torch.tensor(masks)


def expected_counted(padding: str) -> torch.Tensor:
    """[B, L] the response tokens that carry loss, written out per option."""
    out = torch.zeros(len(SAMPLES), L, dtype=torch.bool)
    for b, (prompt, answer) in enumerate(SAMPLES):
        start = 1 + len(prompt)
        end = {"all": L, "first": start + len(answer) + 1, "none": start + len(answer)}[padding]
        out[b, start:end] = True
    return out


def objective(**kw) -> MaskedDiffusion:
    return MaskedDiffusion(DiffusionConfig(prompt_conditioned=True, **kw), SP.mask, SP.pad, seed=5, eos_id=SP.eos)


class Logits(torch.nn.Module):
    """Fixed random logits as a leaf, so the gradient shows which positions the loss reads."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(len(SAMPLES), L, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, xt, t=None):
        return self.logits


@pytest.mark.parametrize("estimator", ["continuous", "exact_count"])
@pytest.mark.parametrize("padding", ["all", "first", "none"])
def test_prompt_never_masked_nor_scored_and_eos_padding_scored_as_configured(estimator, padding):
    x0, prompt = batch()
    obj, counted = objective(estimator=estimator, sft_eos_padding=padding), expected_counted(padding)
    ever_masked = torch.zeros_like(prompt)
    for step in range(60):
        key = BatchKey(step=step, global_batch=len(SAMPLES))
        c = obj.corrupt(x0, key, prompt)
        xt, (_, scored, _, counts) = c.inputs[0], c.targets
        assert torch.equal(xt[prompt], x0[prompt])  # the prompt comes through unchanged
        assert torch.equal(counts, counted.sum(1))  # the answer length each sample is divided by
        assert not (scored & ~counted).any()  # nothing outside the counted response is scored ...
        assert torch.equal(scored, (xt == SP.mask) & counted)  # ... and every counted masked token is
        ever_masked |= xt == SP.mask
        model = Logits(step)
        obj.loss(model, x0, key, prompt).loss.backward()
        read = model.logits.grad.abs().sum(-1) > 0  # [B, L] positions whose logits the loss depends on
        assert torch.equal(read, scored)
    # Uncounted <eos> padding is masked like the rest of the response (its count never shows the answer's length).
    assert torch.equal(ever_masked, ~prompt)


def test_loss_is_llada_sft_per_sample_over_answer_length():
    x0, prompt = batch()
    obj, model = objective(), Logits(1)
    for step in range(5):
        key = BatchKey(step=step, global_batch=len(SAMPLES))
        c = obj.corrupt(x0, key, prompt)
        (xt, ), t = c.inputs, obj.times(key, len(SAMPLES))
        # LLaDA's GUIDELINES.md SFT code, written out: CE / p_mask over masked tokens, each divided by its
        # sample's answer length (response incl. all <eos> padding), summed, divided by the batch size.
        # (SUBS: <mask> is never predicted, so its logit is -inf here too.)
        masked = xt == SP.mask
        answer_lengths = (~prompt).sum(1, keepdim=True).expand_as(x0)
        p_mask = t[:, None].expand_as(x0)
        logits = model.logits.detach().clone()
        logits[..., SP.mask] = float("-inf")
        token_loss = F.cross_entropy(logits[masked], x0[masked], reduction="none") / p_mask[masked]
        want = (token_loss / answer_lengths[masked]).sum() / x0.shape[0]
        got = obj.loss(model, x0, key, prompt).loss
        assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("padding", ["all", "first", "none"])
def test_data_parallel_halves_average_to_the_whole_batch(padding):
    x0, prompt = batch()
    obj, model = objective(sft_eos_padding=padding), Logits(2)
    whole = obj.loss(model, x0, BatchKey(step=3, global_batch=4), prompt).loss
    halves = []
    for r in range(2):
        sl = slice(2 * r, 2 * r + 2)
        part = Logits(2)
        part.logits.data = model.logits.data[sl]
        halves.append(obj.loss(part, x0[sl], BatchKey(step=3, dp_rank=r, dp_world=2, global_batch=4), prompt[sl]).loss)
    assert whole.item() == pytest.approx(sum(h.item() for h in halves) / 2, rel=1e-6)


def test_eval_terms_score_the_counted_response_only():
    x0, prompt = batch()
    for padding in ("all", "first", "none"):
        terms = objective(sft_eos_padding=padding).eval_terms(Logits(3), x0, 3, 7, prompt_mask=prompt)
        assert torch.equal(terms.tokens, expected_counted(padding).sum(1))


def test_without_a_prompt_mask_pretraining_is_unchanged():
    x0, _ = batch()
    plain = MaskedDiffusion(DiffusionConfig(), SP.mask, SP.pad, seed=5)
    key = BatchKey(step=1, global_batch=4)
    c = plain.corrupt(x0, key)
    assert torch.equal(c.inputs[0], objective().corrupt(x0, key).inputs[0])  # same masks as ever
    out = plain.loss(Logits(4), x0, key)
    assert out.num_tokens == x0.numel()


def test_padding_choices_need_the_eos_id():
    x0, prompt = batch()
    obj = MaskedDiffusion(DiffusionConfig(prompt_conditioned=True, sft_eos_padding="first"), SP.mask, SP.pad)
    with pytest.raises(ValueError, match="sft_eos_padding.*eos_id"):
        obj.corrupt(x0, BatchKey(step=0, global_batch=4), prompt)


def test_sft_split_and_prompt_conditioned_must_agree():
    cfg = Config.model_validate({"model": {"size": "tiny"}})
    with pytest.raises(ConfigError, match="SFT split.*set diffusion.prompt_conditioned = true"):
        check_sft_split(cfg, True, "data/chat/train")
    sft = Config.model_validate({"model": {"size": "tiny"}, "diffusion": {"prompt_conditioned": True}})
    with pytest.raises(ConfigError, match="data/train holds pretraining samples.*--format chat"):
        check_sft_split(sft, False, "data/train")
    check_sft_split(sft, True, "data/chat/train")
    with pytest.raises(ValueError, match="prompt_conditioned.*mdlm"):
        DiffusionConfig(prompt_conditioned=True, objective="bd3lm")
