"""Training objectives. Each maps (network, clean tokens x0) to a per-token-normalised loss.

The network only maps tokens (and t) to logits; masking, time sampling, the SUBS parameterisation and
loss weighting live here. An objective works in two phases so pipeline parallelism can run them on
different stages: `corrupt(x0, key)` gives the network inputs and the targets, `loss_from_logits`
scores the network's output. `MaskedDiffusion` is MDLM/MD4's ELBO (continuous-time or exact-count); `BlockDiffusion`
(block.py) is BD3-LM's, one such ELBO per block; `Autoregressive` (autoregressive.py) is the baseline beside them.
With `diffusion.prompt_conditioned` and a prompt mask (SFT), `MaskedDiffusion` is LLaDA's SFT loss: only the
response is masked and scored, and each sample is normalised by its answer length, then averaged over samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from unmask.config import DiffusionConfig
from unmask.core.schedule import get_schedule
from unmask.diffusion.anneal import anneal_mask
from unmask.diffusion.noise import BatchKey, mix, per_sample_uniforms, step_generator

TIME_STREAM = 0x71  # seed offset of the per-sample time draws, apart from the mask draws seeded by (seed, step, i)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, normalised per token; what backward() is called on
    num_tokens: int  # tokens the loss is normalised by
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Corrupted:
    inputs: tuple  # positional arguments of the network: (xt,) or (xt, t)
    targets: tuple[torch.Tensor, ...]  # what loss_from_logits needs; tensors only (pipeline-safe)
    attention: torch.Tensor | None = None  # [L, L] bool training attention for the whole batch; None: the model's own


NLL = Callable[..., torch.Tensor]  # (logits [N, V], targets [N], suppress: int | None = None) -> nll [N]


def dense_nll(logits: torch.Tensor, targets: torch.Tensor, suppress: int | None = None) -> torch.Tensor:
    """-log softmax(logits)[target] per row, token `suppress` excluded: logits [N, V] -> [N]. Objectives take
    another function of this signature under tensor parallelism (vocab-sharded logits, unmask.parallel.tensor)."""
    logits = logits.float()
    if suppress is not None:
        logits = logits.clone()
        logits[:, suppress] = float("-inf")
    return F.cross_entropy(logits, targets, reduction="none")


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation (MDLM): log p(x0 | xt) [B, L, V] in fp32.

    `<mask>` is never predicted (logit -inf) and visible tokens are carried over (probability 1)."""
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    log_probs = logits.log_softmax(-1)
    visible = xt != mask_id
    carried = torch.full_like(log_probs[visible], float("-inf"))
    carried.scatter_(-1, xt[visible][:, None], 0.0)
    log_probs[visible] = carried
    return log_probs


class EvalTerms(NamedTuple):
    nll: torch.Tensor  # NELBO estimate summed per sequence [B] (float64)
    tokens: torch.Tensor  # tokens it covers per sequence [B]
    mc_var: torch.Tensor  # Monte-Carlo variance of `nll` given the tokens [B]; 0 where `nll` is exact
    # `accuracy=True` only (full-vocabulary logits: `unmask eval`, not tensor-parallel validation):
    hits: torch.Tensor | None = None  # predictions whose top-1 is the clean token, per sequence [B]
    predicted: torch.Tensor | None = None  # predictions made (masked tokens over all draws), per sequence [B]


def top1_hits(logits: torch.Tensor, targets: torch.Tensor, picked: torch.Tensor, suppress: int | None = None):
    """Per sequence [B]: how many `picked` [B, L] positions' most likely token (never `suppress`) is the target."""
    chosen = logits[picked].float()
    if suppress is not None:
        chosen[:, suppress] = float("-inf")
    right = (chosen.argmax(-1) == targets[picked]).long()
    return torch.zeros(targets.shape[0], dtype=torch.long, device=targets.device).index_add_(
        0, picked.nonzero()[:, 0], right)


class MaskedDiffusion:
    """Masked diffusion ELBO. `continuous`: mask each token with probability 1 - alpha(t), weight by w(t).
    `exact_count` (LLaDA's likelihood estimator): mask exactly k of a row's n maskable tokens, k uniform on
    1..n, weight n/k; the same ELBO with less variance, as the number masked no longer fluctuates given t."""

    def __init__(self, cfg: DiffusionConfig, mask_id: int, pad_id: int, seed: int = 0,
                 time_conditioned: bool = False, nll: NLL = dense_nll, eos_id: int | None = None):
        self.cfg, self.mask_id, self.pad_id, self.seed = cfg, mask_id, pad_id, seed
        self.eos_id = eos_id  # SFT: finds the response's <eos> padding (diffusion.sft_eos_padding)
        self.schedule = get_schedule(cfg.schedule)
        self.time_conditioned = time_conditioned
        self.nll = nll

    def loss(self, model, x0: torch.Tensor, key: BatchKey, prompt_mask: torch.Tensor | None = None) -> LossOutput:
        c = self.corrupt(x0, key, prompt_mask)
        return self.loss_from_logits(self.network(model, c.inputs, c.attention), c.targets)

    def network(self, model, inputs: tuple, attention: torch.Tensor | None = None) -> torch.Tensor:
        """The network's logits for `Corrupted.inputs` (under the annealed `attention` mask when there is one)."""
        return model(*inputs) if attention is None else model(*inputs, attn_mask=attention)

    def time_draws(self, length: int) -> int:
        """Independent times (or counts) per sample of `length` tokens: one for the whole sequence."""
        return 1

    def corrupt(self, x0: torch.Tensor, key: BatchKey, prompt_mask: torch.Tensor | None = None) -> Corrupted:
        """x0: [B, L] clean tokens; prompt_mask: [B, L] bool, True where tokens are never masked (SFT)."""
        B, L = x0.shape
        # 1. LLaDA: a small fraction of steps is cropped to a random length (same crop on every rank).
        if self.cfg.random_length_prob > 0:
            g = step_generator(self.seed, key.step, -2)
            if torch.rand((), generator=g) < self.cfg.random_length_prob:
                L = int(torch.randint(1, L + 1, (), generator=g))
                x0 = x0[:, :L]
                prompt_mask = None if prompt_mask is None else prompt_mask[:, :L]
        u = per_sample_uniforms(self.seed, key, B, L).to(x0.device)  # [B, L] per-token mask draws
        # 2. Stratified draws [B, draws], antithetic over the global batch of the step: a time t or a count k.
        frac = self.fractions(key, B, self.time_draws(L)).to(x0.device)
        if self.cfg.estimator == "exact_count":
            if self.cfg.clip is not None:  # BD3-LM's clipped schedule: masked shares in [lo, hi)
                frac = self.cfg.clip[0] + (self.cfg.clip[1] - self.cfg.clip[0]) * frac
            c = self._scored(self._mask_count(x0, frac, u, prompt_mask), prompt_mask)
        else:
            # 3. Forward masking: each maskable token -> <mask> with probability 1 - alpha(t).
            c = self._scored(self._mask(x0, self.time_of(frac, self.cfg.clip), u, prompt_mask), prompt_mask)
        # Dream's CART replaces the ELBO weight (training only: eval_terms never comes here, validation stays the
        # NELBO). Context is what the network reads: visible non-pad tokens (prompts count; masked <eos> padding not).
        if self.cfg.token_reweighting == "cart":
            _, masked, _, counts = c.targets
            w = cart_weights((c.inputs[0] != self.mask_id) & (x0 != self.pad_id), self.cfg.cart_p)
            c = Corrupted(c.inputs, (x0, masked, w, counts))
        return self.annealed(c, key.step, L, x0.device)

    def annealed(self, c: Corrupted, step: int, length: int, device) -> Corrupted:
        """`c` under AR adaptation's training attention (DiffuLLaMA): annealed from causal to full over the first
        anneal_steps steps; unchanged after them, or without annealing."""
        attention = anneal_mask(self.seed, step, length, self.cfg.anneal_steps) if self.cfg.anneal_steps else None
        return c if attention is None else Corrupted(c.inputs, c.targets, attention.to(device))

    def fractions(self, key: BatchKey, batch: int, draws: int = 1) -> torch.Tensor:
        """Stratified U[0, 1) draws [B, draws] (float64), the same for a sample in any layout; a sample's `draws`
        take consecutive strata (BD3-LM stratifies over samples and blocks)."""
        u = torch.rand((), generator=step_generator(self.seed, key.step, -1))
        idx = key.indices(batch).double()[:, None] * draws + torch.arange(draws)  # [B, draws]
        if self.cfg.antithetic:  # offsets i/N cover (0, 1] evenly; one shared random shift per step
            return (u + idx / (key.global_batch * draws)) % 1
        # Own stream: seeded like the mask draws, position 0's uniform would equal frac (masked iff t > 0.5).
        return per_sample_uniforms(mix(self.seed, TIME_STREAM), key, batch, draws).double()

    def time_of(self, frac: torch.Tensor, clip: tuple[float, float] | None = None) -> torch.Tensor:
        """Continuous times t in (eps, 1] (or (lo, hi] when clipped) of stratified draws, as float32."""
        lo, hi = clip or (self.cfg.eps, 1.0)
        return (lo + (hi - lo) * (1 - frac)).float()  # 1 - frac in (0, 1]

    def times(self, key: BatchKey, batch: int) -> torch.Tensor:
        """Continuous times t: [B] in (eps, 1]."""
        return self.time_of(self.fractions(key, batch)[:, 0])

    def _maskable(self, x0, prompt_mask) -> torch.Tensor:
        maskable = x0 != self.pad_id  # [B, L]
        if prompt_mask is not None and self.cfg.prompt_conditioned:
            maskable &= ~prompt_mask
        return maskable

    def _sft(self, prompt_mask) -> bool:
        return prompt_mask is not None and self.cfg.prompt_conditioned

    def _scored(self, c: Corrupted, prompt_mask) -> Corrupted:
        """SFT: keep in the targets only the response tokens that `diffusion.sft_eos_padding` counts. The masking
        (the network's input) is left alone: uncounted <eos> padding is still masked, carrying no loss, so the
        network never reads the answer's length off visible <eos>."""
        if not self._sft(prompt_mask) or self.cfg.sft_eos_padding == "all":
            return c  # every maskable (response) token counts: the targets are already right
        x0, masked, weight, _ = c.targets
        counted = self._counted(x0, prompt_mask)
        return Corrupted(c.inputs, (x0, masked & counted, weight, counted.sum(1)))

    def _counted(self, x0, prompt_mask) -> torch.Tensor:
        """[B, L] response tokens that count under `sft_eos_padding` ("first" or "none"). The padding is every
        response token after the first <eos> (sft.py pads with <eos> only)."""
        if self.eos_id is None:
            raise ValueError(f"diffusion.sft_eos_padding = {self.cfg.sft_eos_padding!r} needs the <eos> id: build "
                             "the objective with eos_id (build_objective(..., eos_id=special.eos))")
        response = self._maskable(x0, prompt_mask)
        eos = (x0 == self.eos_id) & response
        seen = eos.long().cumsum(1)  # [B, L] response <eos> up to and including each position
        if self.cfg.sft_eos_padding == "first":
            return response & (seen - eos.long() == 0)  # up to and including the first <eos>
        return response & (seen == 0)  # "none": the answer's text only

    def _mask(self, x0, t, u, prompt_mask) -> Corrupted:
        """t [B, 1]: each row's time."""
        t = t[:, 0]
        maskable = self._maskable(x0, prompt_mask)
        masked = (u < self.schedule.mask_prob(t)[:, None]) & maskable  # [B, L]
        return self._corrupted(x0, masked, maskable, t, self.schedule.weight(t))

    def _mask_count(self, x0, frac, u, prompt_mask) -> Corrupted:
        """frac [B, 1]: each row's draw of its count."""
        maskable = self._maskable(x0, prompt_mask)
        masked, share, weight = count_masks(maskable, frac[:, 0], u)
        return self._corrupted(x0, masked, maskable, self.schedule.time_at(share.float()), weight)

    def _corrupted(self, x0, masked, maskable, t, weight) -> Corrupted:
        xt = torch.where(masked, self.mask_id, x0)  # [B, L]
        inputs = (xt, t) if self.time_conditioned else (xt,)
        return Corrupted(inputs, (x0, masked, weight, maskable.sum(1)))

    def loss_from_logits(self, logits: torch.Tensor, targets: tuple) -> LossOutput:
        x0, masked, weight, counts = targets
        # 5. Only masked positions carry loss (SUBS: visible tokens are copied, mask logit is -inf): [N].
        nll = self.nll(logits[masked], x0[masked], suppress=self.mask_id)
        # 6. ELBO weight of each masked token (w(t), or n/k, of its sample or block): [N].
        weighted = nll * token_weights(weight, x0)[masked]
        num_tokens = int(counts.sum())
        if self.cfg.prompt_conditioned:
            # 7. SFT, LLaDA's normalisation (GUIDELINES.md): each sample's sum divided by its answer length (the
            # counted response tokens, <eos> padding per sft_eos_padding), then the mean over samples. Short and
            # long answers weigh the same, whatever the batch holds; the mean over samples is layout-independent.
            per_token_len = counts[:, None].expand_as(x0)[masked].clamp_min(1)  # [N]
            loss = (weighted / per_token_len).sum() / x0.shape[0]
        else:
            # 7. Normalise per maskable (non-pad) token of the batch.
            loss = weighted.sum() / max(num_tokens, 1)
        return LossOutput(loss, num_tokens, {"mask_rate": float(masked.sum()) / max(num_tokens, 1)})

    @torch.no_grad()
    def eval_terms(self, model, x0: torch.Tensor, time_samples: int, key: BatchKey | int,
                   prompt_mask: torch.Tensor | None = None, accuracy: bool = False) -> EvalTerms:
        """Deterministic NELBO estimate, the same for a sample whatever the batch split or data-parallel layout.

        Always the exact-count estimator (the lower-variance one), whatever the training estimator. `key` places
        the batch in the evaluated set (an int n means BatchKey(step=n): rows are samples 0..B-1). Each sample
        (by its global index in `key`) gets `time_samples` draws with k stratified over them, and a stratum
        offset and mask draws seeded by (seed, key.step, index). With a prompt mask (SFT, prompt_conditioned) only the
        response is masked and scored: the NELBO of the answer given the prompt, over its counted tokens.
        `accuracy`: also count the masked tokens the network's top-1 prediction gets right (EvalTerms.hits)."""
        B, L = x0.shape
        key = BatchKey(step=key, global_batch=B) if isinstance(key, int) else key
        # A random stratum offset per sample (and block), seeded by (key, index) like its masks: deterministic, and
        # unbiased over keys (a fixed offset per index would tie each sample's counts k to its position).
        offset = per_sample_uniforms(mix(self.seed, TIME_STREAM), key, B, self.time_draws(L)).double()  # [B, draws]
        draws, hits, predicted = [], 0, 0
        for j in range(time_samples):
            frac = ((j + offset) / time_samples).to(x0.device)  # [B, draws] in [0, 1), one per stratum
            u = per_sample_uniforms(self.seed, BatchKey(key.step * time_samples + j, key.micro, key.dp_rank,
                                                        key.dp_world, key.global_batch), B, L)
            c = self._scored(self._mask_count(x0, frac, u.to(x0.device), prompt_mask), prompt_mask)
            logits = self.network(model, c.inputs)
            draws.append(self._per_sequence(logits, c.targets))
            if accuracy:
                masked = c.targets[1]
                hits = hits + top1_hits(logits, x0, masked, self.mask_id)
                predicted = predicted + masked.sum(1)
        draws = torch.stack(draws)  # [time_samples, B]
        # The spread over draws, as if they were independent: stratification only lowers the true variance.
        mc_var = draws.var(0) / time_samples if time_samples > 1 else torch.full_like(draws[0], float("nan"))
        scored = (hits, predicted) if accuracy else (None, None)
        return EvalTerms(draws.mean(0), c.targets[3], mc_var, *scored)

    def _per_sequence(self, logits, targets) -> torch.Tensor:
        """Weighted nll summed per sequence: [B] float64."""
        x0, masked, weight, _ = targets
        nll = self.nll(logits[masked], x0[masked], suppress=self.mask_id)  # [N]
        per_seq = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        return per_seq.index_add_(0, masked.nonzero()[:, 0], (nll * token_weights(weight, x0)[masked]).double())


def token_weights(weight: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Each token's ELBO weight [B, L] from a weight per sample [B] or per token [B, L] (block diffusion)."""
    return weight if weight.dim() == 2 else weight[:, None].expand_as(x0)


def cart_weights(context: torch.Tensor, p: float) -> torch.Tensor:
    """Dream's context-adaptive token-level reweighting (CART), weights [B, L] from context [B, L] bool.

    As in ZHZisZZ/dllm `dllm/pipelines/dream/trainer.py`, `cart_weight` (DreamTrainer, loss_weight_type
    "cart[geo_p:0.3]"; Dream's own training code is not public): w_i = sum over context tokens j != i of
    p/2 (1-p)^(|i-j|-1), a geometric law over the 1-based distance, halved per side, not normalised (at most 1: a
    masked token amid unbroken context). It replaces the ELBO weight (w(t) or n/k); `MDLMTrainer.compute_loss`
    still divides by the maskable tokens of the batch ("token" norm), as unmask does. Only masked positions are
    read. Deviation: dllm counts every unmasked position as context, pads included; here pads are not context.
    A row's weights depend on its own context only, so any batch split or parallel layout gives the same loss.
    A convolution truncated where the kernel's tail (1-p)^D drops under 1e-9, instead of dllm's [L, L] matrix."""
    L = context.shape[1]
    q = 1.0 - p
    D = min(L - 1, 1 if q == 0 else math.ceil(math.log(1e-9) / math.log(q)))  # farthest distance kept
    half = 0.5 * p * q ** torch.arange(D, dtype=torch.float64, device=context.device)  # distance 1..D
    kernel = torch.cat([half.flip(0), half.new_zeros(1), half]).float()  # symmetric, 0 at distance 0
    return F.conv1d(context.float()[:, None], kernel[None, None], padding=D)[:, 0]


def count_masks(maskable: torch.Tensor, frac: torch.Tensor, u: torch.Tensor):
    """Mask exactly k = floor(frac * n) + 1 of each row's n maskable tokens (uniform on 1..n): those whose draw `u`
    ranks among the k smallest, so the masks depend only on the row's own draws. maskable, u [R, L]; frac [R].
    Returns (masked [R, L], share k/n [R], weight n/k [R])."""
    n = maskable.sum(1)  # [R]
    k = torch.minimum(n, (frac * n).floor().long() + 1)  # [R]; 0 only where n = 0
    rank = u.masked_fill(~maskable, 2.0).argsort(dim=1, stable=True).argsort(dim=1)  # [R, L], maskable ones first
    masked = rank < k[:, None]  # [R, L]
    share = k / n.clamp_min(1)  # [R] the fraction masked, which the network reads as its time
    weight = (n / k.clamp_min(1)).float()  # [R] n/k: 1/k per masked token, times n (the any-order ELBO)
    return masked, share, weight


def build_objective(cfg: DiffusionConfig, mask_id: int, pad_id: int, seed: int = 0,
                    time_conditioned: bool = False, nll: NLL | None = None, eos_id: int | None = None,
                    vocab_size: int | None = None, vocab_stats=None):
    """`nll`: the per-token loss on the network's logits; None is the dense one (vocab-parallel under TP).
    `eos_id`: the <eos> id, which SFT's sft_eos_padding "first" and "none" need. Uniform-state diffusion (duo)
    needs the model's `vocab_size` and takes `vocab_stats`, its vocabulary reductions of the logits (None: the
    dense ones; vocab-parallel under TP)."""
    nll = nll or dense_nll
    if cfg.objective == "duo":
        from unmask.core.uniform_state import vocab_stats as dense_stats
        from unmask.diffusion.uniform import UniformDiffusion

        if vocab_size is None:
            raise ValueError("diffusion.objective='duo' draws replacement tokens from the whole vocabulary: build the "
                             "objective with vocab_size (build_objective(..., vocab_size=cfg.model.vocab_size))")
        return UniformDiffusion(cfg, pad_id, vocab_size, seed, vocab_stats or dense_stats)
    if cfg.objective == "ar":
        from unmask.diffusion.autoregressive import Autoregressive

        return Autoregressive(pad_id, nll=nll)
    if cfg.objective == "bd3lm":
        from unmask.diffusion.block import BlockDiffusion

        return BlockDiffusion(cfg, mask_id, pad_id, seed, nll=nll)
    return MaskedDiffusion(cfg, mask_id, pad_id, seed, time_conditioned, nll=nll, eos_id=eos_id)
