"""Training objectives. Each maps (network, clean tokens x0) to a per-token-normalised loss.

The network only maps tokens (and t) to logits; masking, time sampling, the SUBS parameterisation and
loss weighting live here. `MaskedDiffusion` is MDLM/MD4's continuous-time ELBO; `Autoregressive`
(in autoregressive.py) is the baseline that sits beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from unmask.config import DiffusionConfig
from unmask.diffusion.schedule import get_schedule, sample_times, time_grid


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, normalised per token; what backward() is called on
    num_tokens: int  # tokens the loss is normalised by
    metrics: dict[str, float] = field(default_factory=dict)


class DenseVocab:
    """Cross-entropy over full-vocabulary logits. Tensor parallelism swaps in a vocab-parallel version
    with the same two methods (unmask.parallel)."""

    def nll(self, logits: torch.Tensor, targets: torch.Tensor, suppress: int | None = None) -> torch.Tensor:
        """-log softmax(logits)[target] per row, with token `suppress` excluded: logits [N, V] -> [N]."""
        logits = logits.float()
        if suppress is not None:
            logits = logits.clone()
            logits[:, suppress] = float("-inf")
        return F.cross_entropy(logits, targets, reduction="none")


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation (MDLM): log p(x0 | xt) [B, L, V] in fp32.

    The `<mask>` token is never predicted (logit -inf) and visible tokens are carried over
    (probability 1 on themselves)."""
    logits = logits.float()
    logits[..., mask_id] = float("-inf")
    log_probs = logits.log_softmax(-1)
    visible = xt != mask_id
    carried = torch.full_like(log_probs[visible], float("-inf"))
    carried.scatter_(-1, xt[visible][:, None], 0.0)
    log_probs[visible] = carried
    return log_probs


class MaskedDiffusion:
    """Masked diffusion ELBO: mask each token with probability 1 - alpha(t), predict it, weight by w(t)."""

    def __init__(self, cfg: DiffusionConfig, mask_id: int, pad_id: int, time_conditioned: bool = False):
        self.cfg, self.mask_id, self.pad_id = cfg, mask_id, pad_id
        self.schedule = get_schedule(cfg.schedule)
        self.time_conditioned = time_conditioned
        self.vocab = DenseVocab()

    def loss(self, model, x0: torch.Tensor, generator: torch.Generator | None = None,
             prompt_mask: torch.Tensor | None = None) -> LossOutput:
        """x0: [B, L] clean tokens; prompt_mask: [B, L] bool, True where tokens are never masked."""
        # 1. LLaDA: a small fraction of batches is cropped to a random length so the model sees short inputs.
        if self.cfg.random_length_prob > 0:
            if torch.rand((), generator=generator) < self.cfg.random_length_prob:
                keep = int(torch.randint(1, x0.shape[1] + 1, (), generator=generator))
                x0 = x0[:, :keep]
                prompt_mask = None if prompt_mask is None else prompt_mask[:, :keep]
        # 2. Times: t [B] in (eps, 1], antithetic over the batch.
        t = sample_times(x0.shape[0], self.cfg.eps, self.cfg.antithetic, generator).to(x0.device)
        return self._weighted_nll(model, x0, t, generator, prompt_mask, reduce=True)

    @torch.no_grad()
    def eval_terms(self, model, x0: torch.Tensor, time_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic NELBO estimate: fixed midpoint time grid and a fixed mask seed.

        Returns (weighted nll summed per sequence [B], token count per sequence [B]); the grid of
        B * time_samples points is spread so every sequence sees `time_samples` distinct times."""
        generator = torch.Generator(device=x0.device).manual_seed(seed)
        B = x0.shape[0]
        grid = time_grid(B * time_samples, self.cfg.eps, device=x0.device).view(B, time_samples)
        total = torch.zeros(B, dtype=torch.float64, device=x0.device)
        for k in range(time_samples):
            nll_sum, counts = self._weighted_nll(model, x0, grid[:, k], generator, None, reduce=False)
            total += nll_sum.double()
        return total / time_samples, counts

    def _weighted_nll(self, model, x0, t, generator, prompt_mask, reduce: bool):
        # 3. Forward masking: each maskable token -> <mask> with probability 1 - alpha(t).
        maskable = x0 != self.pad_id  # [B, L]
        if prompt_mask is not None and self.cfg.prompt_conditioned:
            maskable &= ~prompt_mask
        move = torch.rand(x0.shape, generator=generator, device=x0.device) < self.schedule.mask_prob(t)[:, None]
        masked = move & maskable  # [B, L]
        xt = torch.where(masked, self.mask_id, x0)  # [B, L]
        # 4. Network: logits [B, L, V]; only masked positions carry loss (SUBS: visible ones are copied).
        logits = model(xt, t if self.time_conditioned else None)
        nll = self.vocab.nll(logits[masked], x0[masked], suppress=self.mask_id)  # [N]
        # 5. ELBO weight w(t) per masked token: [N].
        weight = self.schedule.weight(t)[:, None].expand_as(x0)[masked]
        weighted = nll * weight  # [N]
        counts = maskable.sum(1)  # [B]
        if not reduce:
            per_seq = torch.zeros(x0.shape[0], dtype=weighted.dtype, device=x0.device)
            per_seq.index_add_(0, masked.nonzero()[:, 0], weighted)
            return per_seq, counts
        # 6. Normalise per (maskable) token in the batch.
        num_tokens = int(counts.sum())
        loss = weighted.sum() / max(num_tokens, 1)
        return LossOutput(loss, num_tokens, {"mask_rate": float(masked.sum()) / max(num_tokens, 1)})


def build_objective(cfg: DiffusionConfig, mask_id: int, pad_id: int, time_conditioned: bool = False):
    if cfg.objective == "ar":
        from unmask.diffusion.autoregressive import Autoregressive

        return Autoregressive(pad_id)
    return MaskedDiffusion(cfg, mask_id, pad_id, time_conditioned)
