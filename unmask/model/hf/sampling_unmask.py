"""unmask's samplers for an exported model, in plain torch (the export copies this file next to
modeling_unmask.py). It reproduces unmask.diffusion.sampler / sampler_steps operation for operation and draws
random numbers in the same order, so the same model, template and seed give the same tokens in both;
tests/unit/test_export_sampling.py checks it against unmask's sampler for every sampler option.

- `ancestral`: MDLM ancestral sampling (reveal probability (alpha(s) - alpha(t)) / (1 - alpha(t))),
  with caching (a step that reveals nothing makes no network call);
- `remask`: LLaDA/MaskGIT confidence decoding, `low_confidence` or `random` remasking;
both block by block (`block_length`), with classifier-free guidance, temperature / top-k / top-p and float64
Gumbel-max, and optional stop at the first generated `<eos>`.
"""

import math

import torch

DEFAULTS = dict(kind="ancestral", steps=64, block_length=None, remasking="low_confidence", temperature=1.0, top_k=0,
                top_p=1.0, guidance=0.0, cache=True, stop_at_eos=False, seed=0)


def alpha(schedule: str, t: float) -> float:
    """Probability that a token is visible at time t (unmask.diffusion.schedule), in float64."""
    t = torch.tensor(t, dtype=torch.float64)
    if schedule == "loglinear":
        return float(1 - t)
    if schedule == "cosine":
        return float(1 - torch.cos(math.pi / 2 * (1 - t)))
    raise ValueError(f"unknown noise schedule {schedule!r}; allowed: ['cosine', 'loglinear']")


class Denoiser:
    """x_t [B, L] -> float64 logits of x0 at chosen positions [N, V]: guidance, SUBS, NFE count, caching."""

    def __init__(self, model, mask_id, time_conditioned, guidance, prompt_mask, cache):
        self.model, self.mask_id, self.time_conditioned = model, mask_id, time_conditioned
        self.guidance, self.prompt_mask, self.cache = guidance, prompt_mask, cache
        self.nfe, self._last = 0, None

    def full_logits(self, x, t):
        if self.cache and self._last is not None:
            last_x, last_t, last_logits = self._last
            if torch.equal(last_x, x) and (not self.time_conditioned or last_t == t):
                return last_logits
        B, inputs = x.shape[0], x
        if self.guidance:  # unconditional = the same tokens with the prompt masked
            inputs = torch.cat([x, x.masked_fill(self.prompt_mask, self.mask_id)])
        args = (inputs,)
        if self.time_conditioned:
            args = (inputs, torch.full((inputs.shape[0],), t, device=x.device))
        logits = self.model(*args)
        self.nfe += 1
        if self.guidance:
            logits = logits[:B] + self.guidance * (logits[:B] - logits[B:])
        if self.cache:
            self._last = (x.clone(), t, logits)
        return logits

    def __call__(self, x, t, where):
        logits = self.full_logits(x, t)[where].double()
        logits[:, self.mask_id] = float("-inf")  # SUBS: <mask> is never predicted
        return logits


def filter_logits(logits, top_k, top_p):
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits, temperature, top_k, top_p, generator):
    """float64 logits [N, V] -> (tokens [N], their probability [N]); Gumbel-max in float64."""
    if temperature == 0:
        return logits.argmax(-1), logits.softmax(-1).max(-1).values
    logits = filter_logits(logits / temperature, top_k, top_p)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    tokens = (logits + gumbel).argmax(-1)
    return tokens, logits.softmax(-1).gather(-1, tokens[:, None])[:, 0]


class Context:
    def __init__(self, denoiser, schedule, mask_id, o, generator):
        self.denoiser, self.schedule, self.mask_id, self.o, self.generator = denoiser, schedule, mask_id, o, generator

    def choose(self, logits):
        return choose_tokens(logits, self.o["temperature"], self.o["top_k"], self.o["top_p"], self.generator)

    def idle(self, x, t):
        if not self.denoiser.cache:
            self.denoiser.full_logits(x, t)


def ancestral_step(ctx, x, active, t, s, block_masks):
    masked = (x == ctx.mask_id) & active
    a_t, a_s = alpha(ctx.schedule, t), alpha(ctx.schedule, s)
    p = (a_s - a_t) / (1 - a_t)
    u = torch.rand(x.shape, dtype=torch.float64, generator=ctx.generator, device=x.device)
    reveal = masked & (u < p)
    if not reveal.any():
        ctx.idle(x, t)
        return x
    tokens, _ = ctx.choose(ctx.denoiser(x, t, reveal))
    x = x.clone()
    x[reveal] = tokens
    return x


def remask_step(ctx, x, active, t, s, block_masks):
    B, L = x.shape
    masked = (x == ctx.mask_id) & active
    keep = torch.floor(block_masks.double() * (1 - alpha(ctx.schedule, s)) / (1 - alpha(ctx.schedule, 1.0))
                       + 1e-9).long()
    commit_count = (masked.sum(1) - keep).clamp_min(0)
    if not commit_count.any():
        ctx.idle(x, t)
        return x
    tokens, confidence = ctx.choose(ctx.denoiser(x, t, masked))
    if ctx.o["remasking"] == "random":
        confidence = torch.rand(tokens.shape, dtype=torch.float64, generator=ctx.generator, device=x.device)
    board = torch.full((B, L), -math.inf, dtype=torch.float64, device=x.device)
    board[masked] = confidence
    order = board.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=x.device).expand(B, L))
    commit = masked & (rank < commit_count[:, None])
    candidates = x.clone()
    candidates[masked] = tokens
    return torch.where(commit, candidates, x)


def block_ids(generated, block_length):
    if block_length is None:
        return torch.where(generated, 0, -1)
    first = generated.long().argmax(1, keepdim=True)
    pos = torch.arange(generated.shape[1], device=generated.device)[None]
    return torch.where(generated, (pos - first) // block_length, -1)


def first_eos(x, generated, eos_id):
    pos = torch.arange(x.shape[1], device=x.device).expand_as(x)
    return torch.where((x == eos_id) & generated, pos, x.shape[1]).min(1).values


def stop_finished_rows(x, generated, mask_id, eos_id, pad_id):
    first = first_eos(x, generated, eos_id)[:, None]
    pos = torch.arange(x.shape[1], device=x.device)[None]
    masked = x == mask_id
    finished = ~(masked & (pos < first)).any(1, keepdim=True)
    return x.masked_fill(finished & masked & (pos > first), pad_id)


def check(template, o, mask_id, max_len):
    if o["kind"] not in ("ancestral", "remask") or o["remasking"] not in ("low_confidence", "random"):
        raise ValueError(f"sampler kind={o['kind']!r} remasking={o['remasking']!r}; allowed: ancestral|remask, "
                         "low_confidence|random")
    if o["steps"] < 1 or o["temperature"] < 0 or o["top_k"] < 0 or not 0 < o["top_p"] <= 1 or o["guidance"] < 0:
        raise ValueError(f"sampler settings out of range: {o}")
    if template.dim() != 2 or template.dtype != torch.long:
        raise ValueError(f"template must be a [batch, length] int64 tensor, got {tuple(template.shape)}")
    if not (template == mask_id).any(1).all():
        raise ValueError(f"every template row needs a <mask> (id {mask_id}) where text is to be generated")
    if template.shape[1] > max_len:
        raise ValueError(f"template length {template.shape[1]} exceeds the model's max_seq_len {max_len}")


@torch.no_grad()
def sample(model, template, special, schedule, max_len, time_conditioned, prompt_mask=None, **options):
    """Fill every `<mask>` of template [B, L]; `model(tokens[, t]) -> logits`. `special`: dict of mask/eos/pad/bos
    ids. Returns (tokens [B, L], lengths [B], nfe, steps)."""
    o = {**DEFAULTS, **options}
    mask_id = special["mask"]
    check(template, o, mask_id, max_len)
    generated = template == mask_id
    if prompt_mask is None:
        prompt_mask = ~generated & (template != special["pad"])
    if o["guidance"] and not prompt_mask.any(1).all():
        raise ValueError("guidance needs a prompt in every row: a row has no fixed token to condition on")
    blocks = block_ids(generated, o["block_length"])
    n_blocks = int(blocks.max()) + 1
    if o["steps"] < n_blocks:
        raise ValueError(f"steps={o['steps']} is fewer than the {n_blocks} blocks to decode")
    per_block = [o["steps"] // n_blocks + (j < o["steps"] % n_blocks) for j in range(n_blocks)]
    generator = torch.Generator(device=template.device).manual_seed(o["seed"])
    denoiser = Denoiser(model, mask_id, time_conditioned, o["guidance"], prompt_mask, o["cache"])
    ctx = Context(denoiser, schedule, mask_id, o, generator)
    step = ancestral_step if o["kind"] == "ancestral" else remask_step
    x, steps_taken = template.clone(), 0
    for j, n in enumerate(per_block):
        active = blocks == j
        block_masks = ((x == mask_id) & active).sum(1)
        for k in range(n):
            if not ((x == mask_id) & active).any():
                break
            x = step(ctx, x, active, 1 - k / n, 1 - (k + 1) / n, block_masks)
            steps_taken += 1
            if o["stop_at_eos"]:
                x = stop_finished_rows(x, generated, mask_id, special["eos"], special["pad"])
    lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
    if o["stop_at_eos"]:
        lengths = first_eos(x, generated, special["eos"])
        pos = torch.arange(x.shape[1], device=x.device)[None]
        x = x.masked_fill(generated & (pos > lengths[:, None]), special["pad"])
    return x, lengths, denoiser.nfe, steps_taken
