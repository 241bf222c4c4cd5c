"""Sampling from a diffusion model (masked or uniform-state), unmask side: `sample(model, template, cfg, special)`.

The samplers themselves (the block loop, the ancestral and remask steps) live in unmask.core.sampling, the
torch-only file that exported models run too. Here: `SamplerConfig` (the options, failing as SamplingError),
`SampleResult` (tokens with their statistics) and `sample`, which reads the model's settings and times the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from unmask.core.sampling import (
    SamplerOptions,
    check_model,
    check_steps,
    check_template,
    default_prompt_mask,
    generate,
    model_block_size,
)
from unmask.core.schedule import Schedule, get_schedule
from unmask.data.special import SpecialTokens
from unmask.errors import UnmaskError


class SamplingError(UnmaskError, ValueError):
    """A sampler setting or template that cannot work: names the value and how to fix it."""


@dataclass(frozen=True)
class SamplerConfig(SamplerOptions):
    """unmask.core.sampling.SamplerOptions (fields, defaults, checks) whose errors are SamplingErrors."""

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as e:
            raise SamplingError(str(e)) from None


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, L] the template with every mask filled (after <eos>: <pad> when stop_at_eos)
    lengths: torch.Tensor  # [B] tokens before the first generated <eos> (L when none or not stop_at_eos)
    generated: torch.Tensor  # [B, L] bool, the positions that were masks in the template
    nfe: int  # network evaluations (a guided step is one batched evaluation)
    steps: int  # sampling steps taken (fewer than asked when every row stopped early)
    seconds: float

    @property
    def num_generated(self) -> int:
        """Generated tokens that are kept (before each row's length)."""
        keep = torch.arange(self.tokens.shape[1], device=self.tokens.device)[None] < self.lengths[:, None]
        return int((self.generated & keep).sum())

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated / max(self.seconds, 1e-9)

    def token_lists(self, special: SpecialTokens, generated_only: bool = False) -> list[list[int]]:
        """Each row's ids up to its length without <bos>/<eos>/<pad>: whole text (infill) or only the generated
        part (continuations), ready to decode or to score with unmask.eval.diversity."""
        drop = {special.bos, special.eos, special.pad}
        rows = []
        for b in range(self.tokens.shape[0]):
            n = int(self.lengths[b])
            ids, gen = self.tokens[b, :n].tolist(), self.generated[b, :n].tolist()
            rows.append([t for t, g in zip(ids, gen, strict=True) if t not in drop and (g or not generated_only)])
        return rows

    def stats(self) -> dict:
        return {"nfe": self.nfe, "steps": self.steps, "seconds": self.seconds,
                "generated_tokens": self.num_generated, "tokens_per_second": self.tokens_per_second}


@torch.no_grad()
def sample(model, template: torch.Tensor, cfg: SamplerConfig, special: SpecialTokens,
           schedule: Schedule | str = "loglinear", prompt_mask: torch.Tensor | None = None,
           time_conditioned: bool | None = None, process: str = "masked") -> SampleResult:
    """Fill every `<mask>` of `template` [B, L] with `model` (tokens [B, L] (, t [B]) -> logits [B, L, V]).

    prompt_mask [B, L] bool: the prompt positions masked for the unconditional pass of guidance (default:
    every fixed non-pad token). time_conditioned: pass t to the model (default: read from `model.cfg`).
    process: "masked", or "uniform" for a uniform-state (Duo) model (`Loaded.process` says which)."""
    schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
    model_cfg = getattr(model, "cfg", None)
    max_len = getattr(model_cfg, "max_seq_len", None)
    if time_conditioned is None:
        time_conditioned = bool(getattr(model_cfg, "time_conditioning", False))
    if prompt_mask is None:
        prompt_mask = default_prompt_mask(template, special.mask, special.pad)
    try:  # generate checks too; checked here first so a bad template or model is a SamplingError
        check_template(template, cfg, special.mask, max_len, prompt_mask)
        check_model(model, cfg, process, time_conditioned, schedule)
        check_steps(template, cfg, special.mask, model_block_size(model))
    except ValueError as e:
        raise SamplingError(str(e)) from None
    start = time.perf_counter()
    tokens, lengths, nfe, steps = generate(model, template, cfg, special.mask, special.eos, special.pad, schedule,
                                           time_conditioned, prompt_mask, max_len, process)
    return SampleResult(tokens, lengths, template == special.mask, nfe, steps, time.perf_counter() - start)
