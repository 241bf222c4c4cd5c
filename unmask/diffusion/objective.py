"""Training objectives. Each maps (network, clean tokens x0) to a per-token-normalised loss.

The network only maps tokens (and t) to logits; masking, time sampling, the SUBS parameterisation and
loss weighting live here. An objective works in two phases so pipeline parallelism can run them on
different stages: `corrupt(x0, key)` gives the network inputs and the targets, `loss_from_logits`
scores the network's output. `MaskedDiffusion` is MDLM/MD4's continuous-time ELBO; `Autoregressive`
(autoregressive.py) is the baseline beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from unmask.config import DiffusionConfig
from unmask.core.schedule import get_schedule
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


class MaskedDiffusion:
    """Masked diffusion ELBO: mask each token with probability 1 - alpha(t), predict it, weight by w(t)."""

    def __init__(self, cfg: DiffusionConfig, mask_id: int, pad_id: int, seed: int = 0,
                 time_conditioned: bool = False, nll: NLL = dense_nll):
        self.cfg, self.mask_id, self.pad_id, self.seed = cfg, mask_id, pad_id, seed
        self.schedule = get_schedule(cfg.schedule)
        self.time_conditioned = time_conditioned
        self.nll = nll

    def loss(self, model, x0: torch.Tensor, key: BatchKey, prompt_mask: torch.Tensor | None = None) -> LossOutput:
        c = self.corrupt(x0, key, prompt_mask)
        return self.loss_from_logits(model(*c.inputs), c.targets)

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
        # 2. Times t: [B] in (eps, 1], antithetic over the global batch of the step.
        t = self.times(key, B).to(x0.device)
        # 3. Forward masking: each maskable token -> <mask> with probability 1 - alpha(t).
        u = per_sample_uniforms(self.seed, key, B, L).to(x0.device)  # [B, L]
        return self._mask(x0, t, u, prompt_mask)

    def times(self, key: BatchKey, batch: int) -> torch.Tensor:
        u = torch.rand((), generator=step_generator(self.seed, key.step, -1))
        idx = key.indices(batch).double()
        if self.cfg.antithetic:  # offsets i/N cover (0, 1] evenly; one shared random shift per step
            frac = (u + idx / key.global_batch) % 1
        else:
            # Own stream: seeded like the mask draws, position 0's uniform would equal frac (masked iff t > 0.5).
            frac = per_sample_uniforms(mix(self.seed, TIME_STREAM), key, batch, 1)[:, 0].double()
        return (self.cfg.eps + (1 - self.cfg.eps) * (1 - frac)).float()  # 1 - frac in (0, 1]

    def _mask(self, x0, t, u, prompt_mask) -> Corrupted:
        maskable = x0 != self.pad_id  # [B, L]
        if prompt_mask is not None and self.cfg.prompt_conditioned:
            maskable &= ~prompt_mask
        masked = (u < self.schedule.mask_prob(t)[:, None]) & maskable  # [B, L]
        xt = torch.where(masked, self.mask_id, x0)  # [B, L]
        inputs = (xt, t) if self.time_conditioned else (xt,)
        return Corrupted(inputs, (x0, masked, self.schedule.weight(t), maskable.sum(1)))

    def loss_from_logits(self, logits: torch.Tensor, targets: tuple) -> LossOutput:
        x0, masked, weight, counts = targets
        # 4. Only masked positions carry loss (SUBS: visible tokens are copied, mask logit is -inf): [N].
        nll = self.nll(logits[masked], x0[masked], suppress=self.mask_id)
        # 5. ELBO weight w(t) of each masked token's sample: [N].
        weighted = nll * weight[:, None].expand_as(x0)[masked]
        # 6. Normalise per maskable (non-pad, non-prompt) token.
        num_tokens = int(counts.sum())
        loss = weighted.sum() / max(num_tokens, 1)
        return LossOutput(loss, num_tokens, {"mask_rate": float(masked.sum()) / max(num_tokens, 1)})

    @torch.no_grad()
    def eval_terms(self, model, x0: torch.Tensor, time_samples: int,
                   key: BatchKey | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic NELBO estimate, the same for a sample whatever the batch split or data-parallel layout.

        `key` places the batch in the evaluated set (an int n means BatchKey(step=n): rows are samples 0..B-1).
        Each sample (by its global index in `key`) gets `time_samples` stratified times with a fixed per-sample
        offset, and mask draws seeded by (seed, key.step, index). Returns (weighted nll summed per sequence [B],
        maskable tokens per sequence [B])."""
        B, L = x0.shape
        key = BatchKey(step=key, global_batch=B) if isinstance(key, int) else key
        index = key.indices(B).double()  # [B]
        offset = (index * 0.6180339887498949) % 1  # golden-ratio spread of the stratification offsets
        total = torch.zeros(B, dtype=torch.float64, device=x0.device)
        counts = (x0 != self.pad_id).sum(1)
        for k in range(time_samples):
            t = (self.cfg.eps + (1 - self.cfg.eps) * (1 - (k + offset) / time_samples)).float().to(x0.device)
            u = per_sample_uniforms(self.seed, BatchKey(key.step * time_samples + k, key.micro, key.dp_rank,
                                                        key.dp_world, key.global_batch), B, L)
            c = self._mask(x0, t, u.to(x0.device), None)
            x0_, masked, weight, counts = c.targets
            nll = self.nll(model(*c.inputs)[masked], x0_[masked], suppress=self.mask_id)
            per_seq = torch.zeros(B, dtype=torch.float64, device=x0.device)
            per_seq.index_add_(0, masked.nonzero()[:, 0], (nll * weight[:, None].expand_as(x0)[masked]).double())
            total += per_seq
        return total / time_samples, counts


def build_objective(cfg: DiffusionConfig, mask_id: int, pad_id: int, seed: int = 0,
                    time_conditioned: bool = False, nll: NLL | None = None):
    """`nll`: the per-token loss on the network's logits; None is the dense one (vocab-parallel under TP)."""
    nll = nll or dense_nll
    if cfg.objective == "ar":
        from unmask.diffusion.autoregressive import Autoregressive

        return Autoregressive(pad_id, nll=nll)
    return MaskedDiffusion(cfg, mask_id, pad_id, seed, time_conditioned, nll=nll)
