"""One denoising step of each sampler, and the pieces they share.

- `Denoiser` calls the network (a time-conditioned one with each row's own time, read off its masks), applies
  classifier-free guidance and SUBS (the `<mask>` logit is -inf), counts network evaluations (NFE) and remembers
  its last output (caching).
- `choose_tokens` turns logits into tokens: temperature, top-k, top-p, then Gumbel-max in float64.
- `Ancestral` (MDLM), `Remask` (LLaDA/MaskGIT) and `Threshold` (Fast-dLLM) each take the current tokens from time
  t to s < t.

Random numbers are drawn in the same order whether or not the network is called, so a cached run
reproduces an uncached one exactly for the same seed. Imports only torch and its siblings (see unmask.core).
"""

from __future__ import annotations

import math

import torch

from .schedule import Schedule


class Denoiser:
    """The network as the samplers see it: x_t [B, L] -> float64 logits of x0 at chosen positions [N, V].

    generated [B, L]: the template's `<mask>` positions, the ones a time-conditioned network counts in its time.
    block_cache (kv_cache.BlockCache): when given, the network runs through it and may compute only a span of the
    positions (the current block's); the samplers only ask for positions of the current block."""

    def __init__(self, model, mask_id: int, pad_id: int, schedule: Schedule, time_conditioned: bool,
                 guidance: float, prompt_mask: torch.Tensor, generated: torch.Tensor, cache: bool, block_cache=None):
        self.model, self.mask_id, self.pad_id, self.schedule = model, mask_id, pad_id, schedule
        self.time_conditioned, self.guidance, self.cache = time_conditioned, guidance, cache
        self.prompt_mask, self.generated, self.block_cache = prompt_mask, generated, block_cache
        self.nfe = 0
        self._last: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (x, logits [B, n, V], start)

    def start_block(self, active: torch.Tensor) -> None:
        if self.block_cache is not None:
            self.block_cache.start_block(active)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(logits [B, n, V] of positions [start, start + n), start)."""
        if self.block_cache is None:
            return self.model(*args), 0
        return self.block_cache(*args)

    def full_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Guided logits [B, n, V] in the model's dtype of positions from `start`, and start; re-used when the
        input has not changed."""
        if self.cache and self._last is not None and torch.equal(self._last[0], x):
            return self._last[1], self._last[2]
        B = x.shape[0]
        inputs, maskable = x, self.generated & (x != self.pad_id)  # <pad> is never masked in training
        if self.guidance:  # unconditional = the same tokens with the prompt masked (SMDM/LLaDA)
            inputs = torch.cat([x, x.masked_fill(self.prompt_mask, self.mask_id)])  # [2B, L]
            maskable = torch.cat([maskable, maskable | self.prompt_mask])
        args = (inputs, self.row_times(inputs, maskable)) if self.time_conditioned else (inputs,)
        logits, start = self.forward(*args)  # [B or 2B, n, V]
        self.nfe += 1  # conditional and unconditional share one batched call
        if self.guidance:
            logits = guide(logits[:B], logits[B:], self.guidance)
        if self.cache:
            self._last = (x.clone(), logits, start)
        return logits, start

    def row_times(self, inputs: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
        """Each row's time [B]: the one whose mask probability is the row's share of masked maskable positions, the
        quantity training feeds the network. A block's own schedule time is not it: earlier blocks are decoded
        and later ones still masked, and a prompt is never masked."""
        share = (inputs == self.mask_id).sum(1) / maskable.sum(1).clamp_min(1)
        return self.schedule.time_at(share.float())

    def __call__(self, x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """x: [B, L], where: [B, L] bool -> float64 logits [N, V] at the N positions of `where`."""
        logits, start = self.full_logits(x)
        logits = logits[where[:, start:start + logits.shape[1]]].double()  # gather first: float64 only for the used
        logits[:, self.mask_id] = float("-inf")  # SUBS: <mask> is never predicted
        return logits


def guide(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance as in LLaDA, uncond + (1 + w) (cond - uncond), written so that w = 0 returns the
    conditional logits exactly."""
    return cond + weight * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p; others -> -inf. [N, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first one always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits [N, V] -> (tokens [N] drawn from the tempered, filtered distribution, their confidence [N]).

    The confidence that low-confidence remasking ranks by is the model's own probability of the token (the raw
    softmax, as LLaDA's `generate`), not its probability under the temperature and top-k/top-p filter: a filter
    that keeps one token would otherwise make every choice look certain."""
    confidence = logits.softmax(-1)
    if temperature == 0:  # greedy: no noise drawn
        return logits.argmax(-1), confidence.max(-1).values
    tokens = gumbel_argmax(filter_logits(logits / temperature, top_k, top_p), generator)
    return tokens, confidence.gather(-1, tokens[:, None])[:, 0]


def gumbel_argmax(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw [N] from softmax(logits [N, V]) by Gumbel-max in float64: float32 noise shifts low-probability tokens'
    odds (Zheng et al. 2024)."""
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    return (logits + gumbel).argmax(-1)


class StepContext:
    """What every step needs besides the tokens: the network, the noise schedule, the sampling knobs."""

    def __init__(self, denoiser: Denoiser, schedule: Schedule, mask_id: int, temperature: float,
                 top_k: int, top_p: float, generator: torch.Generator):
        self.denoiser, self.schedule, self.mask_id = denoiser, schedule, mask_id
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def alpha(self, t: float) -> float:
        return float(self.schedule.alpha(torch.tensor(t, dtype=torch.float64)))

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return choose_tokens(logits, self.temperature, self.top_k, self.top_p, self.generator)

    def idle(self, x: torch.Tensor) -> None:
        """A step that changes no token: without caching the network still runs (the MDLM baseline)."""
        if not self.denoiser.cache:
            self.denoiser.full_logits(x)


class Ancestral:
    """MDLM ancestral sampling: each mask of the block is revealed between t and s with probability
    (alpha(s) - alpha(t)) / (1 - alpha(t)), its token drawn from p(x0 | x_t); revealed tokens stay."""

    def step(self, ctx: StepContext, x: torch.Tensor, active: torch.Tensor, t: float, s: float,
             block_masks: torch.Tensor) -> torch.Tensor:
        # 1. Masks of the current block: [B, L].
        masked = (x == ctx.mask_id) & active
        # 2. Which of them are revealed: the reveal draw does not depend on the network, so it comes first.
        p = (ctx.alpha(s) - ctx.alpha(t)) / (1 - ctx.alpha(t))
        u = torch.rand(x.shape, dtype=torch.float64, generator=ctx.generator, device=x.device)  # [B, L]
        reveal = masked & (u < p)
        if not reveal.any():
            ctx.idle(x)  # caching: no token changes, so no network call
            return x
        # 3. Tokens for the revealed positions only: [N].
        tokens, _ = ctx.choose(ctx.denoiser(x, reveal))
        x = x.clone()
        x[reveal] = tokens
        return x


def confidence_board(masked: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """Each mask's confidence [N] laid out on the sequence [B, L] (float64), -inf where there is no mask."""
    board = torch.full(masked.shape, -math.inf, dtype=torch.float64, device=masked.device)
    board[masked] = confidence
    return board


class Remask:
    """Confidence-based decoding (LLaDA, MaskGIT): predict every mask of the block, commit the most confident
    (or random) ones so that (1 - alpha(s)) of the block's masks remain, and leave the rest masked."""

    def __init__(self, remasking: str):
        self.remasking = remasking

    def step(self, ctx: StepContext, x: torch.Tensor, active: torch.Tensor, t: float, s: float,
             block_masks: torch.Tensor) -> torch.Tensor:
        B, L = x.shape
        # 1. Masks of the current block [B, L] and how many to commit in each row [B].
        masked = (x == ctx.mask_id) & active
        keep = torch.floor(block_masks.double() * (1 - ctx.alpha(s)) / (1 - ctx.alpha(1.0)) + 1e-9).long()
        commit_count = (masked.sum(1) - keep).clamp_min(0)  # [B]
        if not commit_count.any():
            ctx.idle(x)
            return x
        # 2. A candidate token and its confidence at every mask: [N].
        tokens, confidence = ctx.choose(ctx.denoiser(x, masked))
        if self.remasking == "random":
            confidence = torch.rand(tokens.shape, dtype=torch.float64, generator=ctx.generator, device=x.device)
        # 3. Rank the masks of each row by confidence; commit the top commit_count[b]: [B, L].
        board = confidence_board(masked, confidence)
        order = board.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=x.device).expand(B, L))
        commit = masked & (rank < commit_count[:, None])
        candidates = x.clone()
        candidates[masked] = tokens
        return torch.where(commit, candidates, x)


class Threshold:
    """Fast-dLLM's confidence-threshold parallel decoding (`get_transfer_index` with a threshold): every mask of the
    block whose chosen token has confidence >= threshold is committed, and at least the most confident one, so a
    step always makes progress and the number of steps follows the model's certainty. At threshold 1 nothing passes
    unless the model is certain to float64 precision, so the forced one is committed alone: low-confidence
    remasking, one token per step."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def step(self, ctx: StepContext, x: torch.Tensor, active: torch.Tensor, t: float, s: float,
             block_masks: torch.Tensor) -> torch.Tensor:
        # 1. Masks of the current block [B, L]; a candidate token and its confidence at each [N].
        masked = (x == ctx.mask_id) & active
        tokens, confidence = ctx.choose(ctx.denoiser(x, masked))
        board = confidence_board(masked, confidence)
        # 2. Commit the confident ones and each row's most confident (argmax: the first of equals, as Remask's
        # stable ranking), in rows that still have masks: [B, L].
        commit = masked & (board >= self.threshold)
        top = torch.zeros_like(masked).scatter_(1, board.argmax(1, keepdim=True), True)
        commit |= top & masked
        candidates = x.clone()
        candidates[masked] = tokens
        return torch.where(commit, candidates, x)


def first_eos(x: torch.Tensor, generated: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of each row's first generated <eos> [B]; L when there is none."""
    L = x.shape[1]
    pos = torch.arange(L, device=x.device).expand_as(x)
    return torch.where((x == eos_id) & generated, pos, L).min(1).values


def cut_at_eos(x: torch.Tensor, generated: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens with <pad> after each row's first generated <eos>, lengths [B]: the tokens before it)."""
    lengths = first_eos(x, generated, eos_id)
    pos = torch.arange(x.shape[1], device=x.device)[None]
    return x.masked_fill(generated & (pos > lengths[:, None]), pad_id), lengths
