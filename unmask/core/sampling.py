"""Sampling from a masked-diffusion model: `generate(model, template, options, mask_id, eos_id, pad_id, ...)`.

The template [B, L] holds `<mask>` wherever tokens are to be generated and fixed tokens everywhere else,
so prompt continuation (prompt then masks), infilling (masks anywhere) and unconditional generation (all
masks) are the same call. Fixed tokens never change and a committed token is never changed again.

Samplers (each its own step object in sampling_steps.py):
- `ancestral`: MDLM ancestral sampling; a step that reveals nothing makes no network call (`cache`).
- `remask`: LLaDA/MaskGIT confidence decoding, `low_confidence` or `random` remasking.
- `threshold`: Fast-dLLM parallel decoding: each step commits every mask whose confidence reaches `threshold`
  (at least one); the number of steps follows the model (`steps` is not used), the NFE counts them.
All decode block by block (`block_length`, semi-autoregressive, left to right), take classifier-free guidance,
temperature / top-k / top-p with float64 Gumbel noise, stop at `<eos>`, and can run the network through
Fast-dLLM's approximate KV cache (`kv_cache` "prefix" or "dual", kv_cache.py).
A block-diffusion model (BD3-LM, `model.block_size` b) is decoded block by block along its own blocks of b positions
(`block_length` None or b), by any of the three; `kv_cache="prefix"` keeps the decoded blocks' keys and values, which
is exact for it (kv_cache.FinishedBlocks): the same tokens as the uncached run, each call over one block only.
- `ar`: left-to-right decoding of a causal model (the AR baseline, ar_sampling.py), with an exact KV cache
  (`kv_cache="prefix"`) or a full forward per token ("none").

`process` says which diffusion the model was trained on (its network cannot tell): "masked" (the above) or
"uniform", a uniform-state (UDLM / Duo) model, sampled by its ancestral posterior sampler and Duo's greedy tail
(`noise_removal`; uniform_sampling.py), through this same `generate`.

Imports only torch and its siblings (see unmask.core): unmask's `sample` and an exported model's
`diffusion_generate` both run this loop, so they give the same tokens for the same seed. Errors are plain
ValueErrors; unmask re-raises them as its SamplingError.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .ar_sampling import generate_ar
from .kv_cache import KV_CACHES, BlockCache, FinishedBlocks
from .sampling_steps import Ancestral, Denoiser, Remask, StepContext, Threshold, cut_at_eos, first_eos
from .schedule import Schedule
from .uniform_sampling import check_uniform, generate_uniform

SAMPLERS = ("ancestral", "remask", "threshold", "ar")
REMASKING = ("low_confidence", "random")
PROCESSES = ("masked", "uniform")  # the diffusion a model was trained on: absorbing <mask> or uniform-state (Duo)


@dataclass(frozen=True)
class SamplerOptions:
    kind: str = "ancestral"  # "ancestral" (MDLM), "remask" (LLaDA/MaskGIT), "threshold" (Fast-dLLM), "ar" (causal)
    steps: int = 64  # sampling steps over the whole sequence, split evenly over the blocks (not threshold / ar)
    block_length: int | None = None  # semi-autoregressive blocks of this many positions; None: one block
    remasking: str = "low_confidence"  # remask only: commit the most confident predictions, or random ones
    temperature: float = 1.0  # 0: greedy (no noise)
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # nucleus: smallest set of tokens with this much probability; 1: all
    guidance: float = 0.0  # classifier-free guidance weight w; 0: the conditional model alone
    cache: bool = True  # skip the network on steps that change no token
    stop_at_eos: bool = False  # cut each row at its first generated <eos> (variable-length output)
    seed: int = 0
    threshold: float = 0.9  # threshold only: commit every mask whose confidence reaches it (Fast-dLLM: 0.9)
    kv_cache: str = "none"  # "prefix" / "dual": Fast-dLLM's approximate cache (diffusion); "prefix": exact for ar
    cache_refresh: int = 0  # diffusion kv_cache: also recompute it every N network calls; 0: only at block starts
    # uniform-state (Duo) models only, the last step at the grid's end: "greedy" (argmax of x_theta, Duo's greedy
    # tail) or "ancestral" (a last posterior draw to alpha = 1); None: greedy
    noise_removal: str | None = None

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
            (0 < self.threshold <= 1, f"threshold={self.threshold}: must be in (0, 1] (1 commits one token a step)"),
            (self.kv_cache in KV_CACHES, f"kv_cache={self.kv_cache!r}; allowed: {list(KV_CACHES)}"),
            (self.noise_removal in (None, "greedy", "ancestral"),
             f"noise_removal={self.noise_removal!r}; allowed: greedy (Duo's greedy tail), ancestral, or none given"),
            (self.cache_refresh >= 0, f"cache_refresh={self.cache_refresh}: must be >= 0 (0: at block starts only)"),
            (not self.cache_refresh or self.kv_cache != "none",
             f"cache_refresh={self.cache_refresh} refreshes a KV cache, and kv_cache='none': set kv_cache to "
             "'prefix' or 'dual', or cache_refresh=0"),
            (self.kind != "ar" or self.kv_cache != "dual",
             "kv_cache='dual' caches positions after the current one, which a causal model never reads: use "
             "kv_cache='prefix' (exact) for kind='ar'"),
            (self.kind != "ar" or not self.guidance,
             "guidance masks the prompt, which an autoregressive model cannot take: set guidance=0 for kind='ar'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"sampler: {message}")

    def to_dict(self) -> dict:
        return asdict(self)


def block_ids(generated: torch.Tensor, block_length: int | None, aligned: bool = False) -> torch.Tensor:
    """Block of each position [B, L]: blocks of `block_length` positions from each row's first mask (`aligned`: the
    model's own blocks [0, b), [b, 2b), ..., counted from the one holding the row's first mask); -1 fixed."""
    if block_length is None:
        return torch.where(generated, 0, -1)
    L = generated.shape[1]
    first = generated.long().argmax(1, keepdim=True)  # [B, 1] first mask of each row
    pos = torch.arange(L, device=generated.device)[None]
    if aligned:
        return torch.where(generated, pos // block_length - first // block_length, -1)
    return torch.where(generated, (pos - first) // block_length, -1)


def model_block_size(model) -> int:
    """The block size of a block-diffusion model (BD3-LM); 0 for any other."""
    return int(getattr(model, "block_size", 0) or 0)


def decoding_blocks(generated: torch.Tensor, options: SamplerOptions, block_size: int) -> torch.Tensor:
    """block_ids for this sampler and model: a block-diffusion model is decoded along its own blocks."""
    if block_size:
        return block_ids(generated, block_size, aligned=True)
    return block_ids(generated, options.block_length)


def split_steps(steps: int, blocks: int) -> list[int]:
    """Steps per block, as even as possible (the first blocks take the remainder)."""
    if steps < blocks:
        raise ValueError(f"steps={steps} is fewer than the {blocks} blocks to decode: "
                         f"use at least {blocks} steps or a longer block_length")
    return [steps // blocks + (j < steps % blocks) for j in range(blocks)]


def default_prompt_mask(template: torch.Tensor, mask_id: int, pad_id: int) -> torch.Tensor:
    """The positions guidance masks for its unconditional pass: every fixed token but <pad>. [B, L] bool."""
    return (template != mask_id) & (template != pad_id)


def check_template(template: torch.Tensor, options: SamplerOptions, mask_id: int, max_len: int | None,
                   prompt_mask: torch.Tensor | None) -> None:
    """Every template problem as one ValueError naming the value, before any network call."""
    if template.dim() != 2 or template.dtype != torch.long:
        raise ValueError(f"template must be a [batch, length] int64 tensor, got {tuple(template.shape)} "
                         f"{template.dtype}")
    masks = template == mask_id
    empty = (~masks.any(1)).nonzero()[:, 0].tolist()
    if empty:
        raise ValueError(f"template row(s) {empty} have no <mask> (id {mask_id}) to fill: "
                         "put <mask> where text should be generated")
    if max_len is not None and template.shape[1] > max_len:
        raise ValueError(f"template length {template.shape[1]} exceeds the model's max_seq_len {max_len}: "
                         "shorten the prompt or the length to generate")
    if prompt_mask is not None and prompt_mask.shape != template.shape:
        raise ValueError(f"prompt_mask shape {tuple(prompt_mask.shape)} != template {tuple(template.shape)}")
    if options.guidance and prompt_mask is not None and not prompt_mask.any(1).all():
        rows = (~prompt_mask.any(1)).nonzero()[:, 0].tolist()
        raise ValueError(f"guidance needs a prompt in every row: row(s) {rows} have no prompt token to condition "
                         "on (set guidance=0 for unconditional rows)")
    if options.kind == "ar" and masks[:, 0].any():
        raise ValueError("kind='ar' predicts each token from the ones before it: every template row needs a fixed "
                         "token (e.g. <bos>) before its first <mask>")


def check_steps(template: torch.Tensor, options: SamplerOptions, mask_id: int, block_size: int) -> None:
    if options.kind in ("ancestral", "remask"):  # threshold and ar take as many steps as they need
        split_steps(options.steps, int(decoding_blocks(template == mask_id, options, block_size).max()) + 1)


def check_model(model, options: SamplerOptions, process: str = "masked", time_conditioned: bool = True,
                schedule: Schedule | None = None) -> None:
    """The sampler and the model agree: ar for a causal model only, a KV cache only where the model takes one, a
    block-diffusion model decoded along its own blocks; a uniform-state model by its own sampler."""
    if process not in PROCESSES:
        raise ValueError(f"process={process!r} is not a diffusion process; allowed: {list(PROCESSES)} (uniform: a "
                         "uniform-state model, diffusion.objective = 'duo')")
    if process == "uniform":
        check_uniform(model, options, time_conditioned, schedule)
        return
    if options.noise_removal is not None:
        raise ValueError(f"noise_removal={options.noise_removal!r} is the last step of a uniform-state (Duo) model, "
                         "and this is a masked-diffusion one, whose last step reveals every mask: leave it out")
    causal = bool(getattr(model, "causal", False))
    if causal and options.kind != "ar":
        raise ValueError(f"kind={options.kind!r} is a masked-diffusion sampler but this model is causal (an "
                         "autoregressive baseline): use kind='ar'")
    if options.kind == "ar" and not causal:
        raise ValueError("kind='ar' decodes left to right with a causal model, and this model attends both ways: "
                         "use a diffusion sampler (ancestral, remask, threshold)")
    block_size = model_block_size(model)
    if block_size and options.block_length not in (None, block_size):
        raise ValueError(f"block_length={options.block_length}: this block-diffusion model was trained on blocks of "
                         f"{block_size} and decodes along them: leave block_length out or set it to {block_size}")
    if block_size and options.kv_cache == "dual":
        raise ValueError("kv_cache='dual' caches positions after the current block, which a block-diffusion model "
                         "never reads: use kv_cache='prefix' (exact for it) or 'none'")
    if block_size and options.cache_refresh:
        raise ValueError(f"cache_refresh={options.cache_refresh}: a block-diffusion model's KV cache is exact and "
                         "never needs refreshing: set cache_refresh=0")
    if options.kv_cache != "none" and not getattr(model, "supports_kv_cache", False):
        raise ValueError(f"kv_cache={options.kv_cache!r} needs a model that takes cached keys/values (unmask's "
                         f"transformer); {type(model).__name__} does not: use kv_cache='none'")


def stop_finished_rows(x, generated, mask_id: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """A row whose first generated <eos> has no mask before it is finished: its later masks could only make
    text that is cut off, so they become <pad> and take no more steps."""
    first = first_eos(x, generated, eos_id)[:, None]  # [B, 1]
    pos = torch.arange(x.shape[1], device=x.device)[None]
    masked = x == mask_id
    finished = ~(masked & (pos < first)).any(1, keepdim=True)  # [B, 1]
    return x.masked_fill(finished & masked & (pos > first), pad_id)


@torch.no_grad()
def generate(model, template: torch.Tensor, options: SamplerOptions, mask_id: int, eos_id: int, pad_id: int,
             schedule: Schedule, time_conditioned: bool, prompt_mask: torch.Tensor | None = None,
             max_len: int | None = None, process: str = "masked") -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Fill every `<mask>` of `template` [B, L] with `model` (tokens [B, L] (, t [B]) -> logits [B, L, V]).
    process: "masked" (MDLM-style models) or "uniform" (uniform-state, Duo; the `<mask>` positions start uniform).

    prompt_mask [B, L] bool: the prompt positions masked for the unconditional pass of guidance (default:
    every fixed non-pad token). Returns (tokens [B, L] (after <eos>: <pad> when stop_at_eos), lengths [B]
    (tokens before the first generated <eos>; L when none or not stop_at_eos), network evaluations, steps)."""
    o = options
    if prompt_mask is None:
        prompt_mask = default_prompt_mask(template, mask_id, pad_id)
    check_template(template, o, mask_id, max_len, prompt_mask)
    check_model(model, o, process, time_conditioned, schedule)
    if process == "uniform":
        return generate_uniform(model, template, o, mask_id, eos_id, pad_id)
    block_size = model_block_size(model)
    check_steps(template, o, mask_id, block_size)
    if o.kind == "ar":
        return generate_ar(model, template, o, mask_id, eos_id, pad_id)
    generated = template == mask_id  # [B, L]
    blocks = decoding_blocks(generated, o, block_size)  # [B, L]
    per_block = steps_per_block(o, blocks)
    generator = torch.Generator(device=template.device).manual_seed(o.seed)
    block_cache = None
    if o.kv_cache != "none":
        block_cache = FinishedBlocks(model, block_size) if block_size else BlockCache(model, o.kv_cache,
                                                                                        o.cache_refresh)
    denoiser = Denoiser(model, mask_id, pad_id, schedule, time_conditioned, o.guidance, prompt_mask, generated, o.cache,
                        block_cache)
    ctx = StepContext(denoiser, schedule, mask_id, o.temperature, o.top_k, o.top_p, generator)
    stepper = {"ancestral": Ancestral, "remask": lambda: Remask(o.remasking),
               "threshold": lambda: Threshold(o.threshold)}[o.kind]()

    x, steps_taken = template.clone(), 0
    for j, n in enumerate(per_block):
        active = blocks == j  # [B, L]
        block_masks = ((x == mask_id) & active).sum(1)  # [B], the masks this block starts with
        denoiser.start_block(active)
        for k in range(n):
            if not ((x == mask_id) & active).any():
                break  # every row finished this block (stopped at <eos>)
            # Time runs from 1 to 0 inside each block; the last step reaches 0 and reveals every mask left.
            x = stepper.step(ctx, x, active, 1 - k / n, 1 - (k + 1) / n, block_masks)
            steps_taken += 1
            if o.stop_at_eos:
                x = stop_finished_rows(x, generated, mask_id, eos_id, pad_id)
    lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
    if o.stop_at_eos:
        x, lengths = cut_at_eos(x, generated, eos_id, pad_id)  # text after <eos> is dropped
    return x, lengths, denoiser.nfe, steps_taken


def steps_per_block(options: SamplerOptions, blocks: torch.Tensor) -> list[int]:
    """The step budget of each block; threshold's is the block's mask count (each step commits at least one, and
    the loop stops as soon as the block is decoded)."""
    n_blocks = int(blocks.max()) + 1
    if options.kind == "threshold":
        return [int((blocks == j).sum(1).max()) for j in range(n_blocks)]
    return split_steps(options.steps, n_blocks)
