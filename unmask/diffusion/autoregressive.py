"""The autoregressive baseline: same backbone with causal attention, next-token loss.

Its perplexity on held-out shards is directly comparable with the masked-diffusion perplexity bound
(the AR model predicts tokens 2..L of each sequence; the diffusion bound covers all L). Every row opens
with <bos> (shards.py), so the model always reads <bos> at position 0, as the AR judge (UnmaskCausalLM)
prefixes every text it scores."""

from __future__ import annotations

import torch

from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import NLL, Corrupted, EvalTerms, LossOutput, dense_nll, top1_hits


class Autoregressive:
    def __init__(self, pad_id: int, nll: NLL = dense_nll):
        self.pad_id = pad_id
        self.nll = nll  # dense, or vocab-parallel under tensor parallelism

    def corrupt(self, x0: torch.Tensor, key: BatchKey | None = None, prompt_mask=None) -> Corrupted:
        return Corrupted((x0[:, :-1],), (x0[:, 1:],))  # inputs [B, L-1], targets [B, L-1]

    def loss_from_logits(self, logits: torch.Tensor, targets: tuple) -> LossOutput:
        (y,) = targets
        valid = y != self.pad_id
        nll = self.nll(logits[valid], y[valid])  # [N]
        num_tokens = int(valid.sum())
        return LossOutput(nll.sum() / max(num_tokens, 1), num_tokens)

    def loss(self, model, x0, key: BatchKey | None = None, prompt_mask=None) -> LossOutput:
        c = self.corrupt(x0)
        return self.loss_from_logits(model(*c.inputs), c.targets)

    @torch.no_grad()
    def eval_terms(self, model, x0, time_samples: int = 1, seed: int = 0, accuracy: bool = False) -> EvalTerms:
        """Exact NLL summed per sequence [B] and predicted-token counts [B]; no randomness, so no variance.
        `accuracy`: also the next-token top-1 hits."""
        c = self.corrupt(x0)
        (y,) = c.targets
        valid = y != self.pad_id
        logits = model(*c.inputs)
        nll = self.nll(logits[valid], y[valid])
        per_seq = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        per_seq.index_add_(0, valid.nonzero()[:, 0], nll.double())
        scored = (top1_hits(logits, y, valid), valid.sum(1)) if accuracy else (None, None)
        return EvalTerms(per_seq, valid.sum(1), torch.zeros_like(per_seq), *scored)
