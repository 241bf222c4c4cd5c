"""The autoregressive baseline: same backbone with causal attention, next-token loss.

Its perplexity on held-out shards is directly comparable with the masked-diffusion perplexity bound."""

from __future__ import annotations

import torch

from unmask.diffusion.objective import DenseVocab, LossOutput


class Autoregressive:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.vocab = DenseVocab()

    def _nll(self, model, x0: torch.Tensor):
        logits = model(x0[:, :-1])  # [B, L-1, V]
        targets = x0[:, 1:]  # [B, L-1]
        valid = targets != self.pad_id
        nll = self.vocab.nll(logits[valid], targets[valid])  # [N]
        return nll, valid

    def loss(self, model, x0, generator=None, prompt_mask=None) -> LossOutput:
        nll, valid = self._nll(model, x0)
        num_tokens = int(valid.sum())
        return LossOutput(nll.sum() / max(num_tokens, 1), num_tokens)

    @torch.no_grad()
    def eval_terms(self, model, x0, time_samples: int = 1, seed: int = 0):
        """Exact NLL per sequence [B] (summed) and predicted-token counts [B]; no randomness."""
        nll, valid = self._nll(model, x0)
        per_seq = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        per_seq.index_add_(0, valid.nonzero()[:, 0], nll.double())
        return per_seq, valid.sum(1)
