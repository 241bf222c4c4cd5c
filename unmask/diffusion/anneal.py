"""Attention-mask annealing for adapting a causal LM to masked diffusion (DiffuLLaMA, Gong et al. 2024;
HKUNLP/DiffuLLaMA `train/ddm/trainer.py` `get_anneal_attn_mask`).

At step s of `anneal_steps` the training attention is the causal mask (diagonal included) OR-ed with Bernoulli(r)
noise, r = s / anneal_steps: step 0 is the source model's own causal attention, and every query gains a growing
random share of the later keys until attention is full. One [L, L] mask per step is shared by the whole batch, as
DiffuLLaMA's is. It is drawn from (seed, step) alone, so every rank, micro-batch, parallel layout and resumed run
trains on the same mask without saving any RNG state. DiffuLLaMA's r is (step + 1) / anneal_steps; starting at 0
makes the first step exactly the imported model's attention, which the shift test relies on.
"""

from __future__ import annotations

import torch

from unmask.diffusion.noise import step_generator

ANNEAL_STREAM = -3  # step_generator stream of the mask draws (-1: time offsets, -2: random-length crops)


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """The share r of off-causal entries attended at `step`: 0 at step 0, 1 from `anneal_steps` on."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


def anneal_mask(seed: int, step: int, length: int, anneal_steps: int) -> torch.Tensor | None:
    """[L, L] bool, True where query i may attend key j, on the CPU; None once attention is full (the network's own
    mask-free path, and the model that validation, sampling and export see)."""
    r = anneal_ratio(step, anneal_steps)
    if r >= 1.0:
        return None
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    noise = torch.rand(length, length, generator=step_generator(seed, step, ANNEAL_STREAM)) < r
    return causal | noise
