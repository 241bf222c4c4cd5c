"""Sampling from a masked-diffusion model: one interface, `sample(model, template, cfg, special)`.

The template [B, L] holds `<mask>` wherever tokens are to be generated and fixed tokens everywhere else,
so prompt continuation (prompt then masks), infilling (masks anywhere) and unconditional generation (all
masks) are the same call. Fixed tokens never change and a committed token is never changed again.

Samplers (each its own step object in sampler_steps.py):
- `ancestral`: MDLM ancestral sampling; a step that reveals nothing makes no network call (`cache`).
- `remask`: LLaDA/MaskGIT confidence decoding, `low_confidence` or `random` remasking.
Both decode block by block (`block_length`, semi-autoregressive, left to right) and both take
classifier-free guidance, temperature / top-k / top-p with float64 Gumbel noise, and stop at `<eos>`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler_steps import Ancestral, Denoiser, Remask, StepContext
from unmask.diffusion.schedule import Schedule, get_schedule
from unmask.errors import UnmaskError


class SamplingError(UnmaskError, ValueError):
    """A sampler setting or template that cannot work: names the value and how to fix it."""


SAMPLERS = ("ancestral", "remask")
REMASKING = ("low_confidence", "random")


@dataclass(frozen=True)
class SamplerConfig:
    kind: str = "ancestral"  # "ancestral" (MDLM) or "remask" (LLaDA/MaskGIT confidence decoding)
    steps: int = 64  # sampling steps over the whole sequence, split evenly over the blocks
    block_length: int | None = None  # semi-autoregressive blocks of this many positions; None: one block
    remasking: str = "low_confidence"  # remask only: commit the most confident predictions, or random ones
    temperature: float = 1.0  # 0: greedy (no noise)
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # nucleus: smallest set of tokens with this much probability; 1: all
    guidance: float = 0.0  # classifier-free guidance weight w; 0: the conditional model alone
    cache: bool = True  # skip the network on steps that change no token
    stop_at_eos: bool = False  # cut each row at its first generated <eos> (variable-length output)
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.kind in SAMPLERS, f"kind={self.kind!r} is not a sampler; allowed: {list(SAMPLERS)}"),
            (self.remasking in REMASKING, f"remasking={self.remasking!r}; allowed: {list(REMASKING)}"),
            (self.steps >= 1, f"steps={self.steps}: need at least 1 sampling step"),
            (self.block_length is None or self.block_length >= 1,
             f"block_length={self.block_length}: need at least 1 position per block (or none)"),
            (self.temperature >= 0, f"temperature={self.temperature}: must be >= 0 (0 is greedy)"),
            (self.top_k >= 0, f"top_k={self.top_k}: must be >= 0 (0 keeps every token)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]"),
            (self.guidance >= 0, f"guidance={self.guidance}: must be >= 0 (0 is no guidance)"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(f"sampler: {message}")

    def to_dict(self) -> dict:
        return asdict(self)


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


def _check_template(template: torch.Tensor, cfg: SamplerConfig, special: SpecialTokens, model,
                    prompt_mask: torch.Tensor | None) -> None:
    if template.dim() != 2 or template.dtype != torch.long:
        raise SamplingError(f"template must be a [batch, length] int64 tensor, got {tuple(template.shape)} "
                            f"{template.dtype}")
    masks = template == special.mask
    empty = (~masks.any(1)).nonzero()[:, 0].tolist()
    if empty:
        raise SamplingError(f"template row(s) {empty} have no <mask> (id {special.mask}) to fill: "
                            "put <mask> where text should be generated")
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if max_len is not None and template.shape[1] > max_len:
        raise SamplingError(f"template length {template.shape[1]} exceeds the model's max_seq_len {max_len}: "
                            "shorten the prompt or the length to generate")
    if prompt_mask is not None and prompt_mask.shape != template.shape:
        raise SamplingError(f"prompt_mask shape {tuple(prompt_mask.shape)} != template {tuple(template.shape)}")
    if cfg.guidance and prompt_mask is not None and not prompt_mask.any(1).all():
        raise SamplingError("guidance needs a prompt in every row: a row has no prompt token to mask")


def block_ids(generated: torch.Tensor, block_length: int | None) -> torch.Tensor:
    """Block of each position [B, L]: blocks of `block_length` positions from each row's first mask; -1 fixed."""
    if block_length is None:
        return torch.where(generated, 0, -1)
    L = generated.shape[1]
    first = generated.long().argmax(1, keepdim=True)  # [B, 1] first mask of each row
    pos = torch.arange(L, device=generated.device)[None]
    return torch.where(generated, (pos - first) // block_length, -1)


def split_steps(steps: int, blocks: int) -> list[int]:
    """Steps per block, as even as possible (the first blocks take the remainder)."""
    if steps < blocks:
        raise SamplingError(f"steps={steps} is fewer than the {blocks} blocks to decode: "
                            f"use at least {blocks} steps or a longer block_length")
    return [steps // blocks + (j < steps % blocks) for j in range(blocks)]


def _first_eos(x: torch.Tensor, generated: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of each row's first generated <eos> [B]; L when there is none."""
    L = x.shape[1]
    pos = torch.arange(L, device=x.device).expand_as(x)
    return torch.where((x == eos_id) & generated, pos, L).min(1).values


def _stop_finished_rows(x, generated, special: SpecialTokens) -> torch.Tensor:
    """A row whose first generated <eos> has no mask before it is finished: its later masks could only make
    text that is cut off, so they become <pad> and take no more steps."""
    first = _first_eos(x, generated, special.eos)[:, None]  # [B, 1]
    pos = torch.arange(x.shape[1], device=x.device)[None]
    masked = x == special.mask
    finished = ~(masked & (pos < first)).any(1, keepdim=True)  # [B, 1]
    return x.masked_fill(finished & masked & (pos > first), special.pad)


@torch.no_grad()
def sample(model, template: torch.Tensor, cfg: SamplerConfig, special: SpecialTokens,
           schedule: Schedule | str = "loglinear", prompt_mask: torch.Tensor | None = None,
           time_conditioned: bool | None = None) -> SampleResult:
    """Fill every `<mask>` of `template` [B, L] with `model` (tokens [B, L] (, t [B]) -> logits [B, L, V]).

    prompt_mask [B, L] bool: the prompt positions masked for the unconditional pass of guidance (default:
    every fixed non-pad token). time_conditioned: pass t to the model (default: read from `model.cfg`)."""
    schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
    _check_template(template, cfg, special, model, prompt_mask)
    if time_conditioned is None:
        time_conditioned = bool(getattr(getattr(model, "cfg", None), "time_conditioning", False))
    generated = template == special.mask  # [B, L]
    if prompt_mask is None:
        prompt_mask = ~generated & (template != special.pad)
        if cfg.guidance and not prompt_mask.any(1).all():
            raise SamplingError("guidance needs a prompt in every row: a row has no fixed token to condition on")
    blocks = block_ids(generated, cfg.block_length)  # [B, L]
    per_block = split_steps(cfg.steps, int(blocks.max()) + 1)
    generator = torch.Generator(device=template.device).manual_seed(cfg.seed)
    denoiser = Denoiser(model, special.mask, time_conditioned, cfg.guidance, prompt_mask, cfg.cache)
    ctx = StepContext(denoiser, schedule, special.mask, cfg.temperature, cfg.top_k, cfg.top_p, generator)
    stepper = Ancestral() if cfg.kind == "ancestral" else Remask(cfg.remasking)

    start, x, steps_taken = time.perf_counter(), template.clone(), 0
    for j, n in enumerate(per_block):
        active = blocks == j  # [B, L]
        block_masks = ((x == special.mask) & active).sum(1)  # [B], the masks this block starts with
        for k in range(n):
            if not ((x == special.mask) & active).any():
                break  # every row finished this block (stopped at <eos>)
            # Time runs from 1 to 0 inside each block; the last step reaches 0 and reveals every mask left.
            x = stepper.step(ctx, x, active, 1 - k / n, 1 - (k + 1) / n, block_masks)
            steps_taken += 1
            if cfg.stop_at_eos:
                x = _stop_finished_rows(x, generated, special)
    lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
    if cfg.stop_at_eos:
        lengths = _first_eos(x, generated, special.eos)
        pos = torch.arange(x.shape[1], device=x.device)[None]
        x = x.masked_fill(generated & (pos > lengths[:, None]), special.pad)  # text after <eos> is dropped
    return SampleResult(x, lengths, generated, denoiser.nfe, steps_taken, time.perf_counter() - start)
