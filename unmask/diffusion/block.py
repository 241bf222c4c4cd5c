"""Block diffusion (BD3-LM, Arriola et al. 2025; kuleshov-group/bd3lms `diffusion.py`).

The sequence is cut into blocks of `diffusion.block_size` tokens. The model is autoregressive over blocks and a
masked-diffusion model inside each: log p(x) = sum_b log p(x_b | x_<b), each term bounded by the masked-diffusion
ELBO of block b given the clean blocks before it. Training is the paper's vectorised pass: the network reads the
noised sequence x_t and the clean x_0 side by side (`Transformer.forward(x_t, clean=x_0)`), each noised block
attending itself and the clean blocks before it.

Each block draws its own time (or its own count k, with the exact-count estimator), stratified over the samples
and blocks of the global batch (bd3lms' `_sample_t`). Block size 1 is the autoregressive factorisation (every
block is one masked token read from the clean ones before it: the bound is exact), and a single block covering
the sequence is MDLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unmask.config import DiffusionConfig
from unmask.diffusion.objective import NLL, Corrupted, MaskedDiffusion, count_masks, dense_nll


class BlockDiffusion(MaskedDiffusion):
    def __init__(self, cfg: DiffusionConfig, mask_id: int, pad_id: int, seed: int = 0, nll: NLL = dense_nll):
        # No time conditioning: BD3-LM's blocks each have their own time, and the network reads none (config.py).
        super().__init__(cfg, mask_id, pad_id, seed, time_conditioned=False, nll=nll)
        self.block_size = cfg.block_size

    def network(self, model, inputs: tuple, attention: torch.Tensor | None = None) -> torch.Tensor:
        xt, x0 = inputs
        return model(xt, clean=x0)

    def time_draws(self, length: int) -> int:
        """One time per block; a last block shorter than block_size (a random-length crop) has its own."""
        return -(-length // self.block_size)

    def per_token(self, per_block: torch.Tensor, length: int) -> torch.Tensor:
        """[B, blocks] -> [B, length]: each token gets its block's value."""
        return per_block.repeat_interleave(self.block_size, dim=1)[:, :length]

    def _mask(self, x0, t, u, prompt_mask) -> Corrupted:
        """t [B, blocks]: each block's time; tokens are masked with their block's probability, weighted by w(t)."""
        maskable = self._maskable(x0, prompt_mask)
        t = self.per_token(t, x0.shape[1])  # [B, L]
        masked = (u < self.schedule.mask_prob(t)) & maskable
        return self._corrupted(x0, masked, maskable, None, self.schedule.weight(t))

    def _mask_count(self, x0, frac, u, prompt_mask) -> Corrupted:
        """frac [B, blocks]: each block masks exactly k of its n maskable tokens (k uniform on 1..n), weight n/k."""
        B, L = x0.shape
        blocks, size = frac.shape[1], self.block_size
        tail = blocks * size - L  # a short last block is padded with unmaskable positions
        maskable = self._maskable(x0, prompt_mask)
        rows = F.pad(maskable, (0, tail), value=False).view(B * blocks, size)
        masked, _, weight = count_masks(rows, frac.reshape(-1), F.pad(u, (0, tail), value=2.0).view(B * blocks, size))
        masked = masked.view(B, blocks * size)[:, :L]
        return self._corrupted(x0, masked, maskable, None, self.per_token(weight.view(B, blocks), L))

    def _corrupted(self, x0, masked, maskable, t, weight) -> Corrupted:
        """Network inputs (x_t, x_0); the weight is per token [B, L]."""
        xt = torch.where(masked, self.mask_id, x0)
        return Corrupted((xt, x0), (x0, masked, weight, maskable.sum(1)))
