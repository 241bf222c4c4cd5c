"""Noise schedules alpha(t): the probability that a token is still visible at time t in [0, 1].

A schedule gives alpha(t) and its derivative; the ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) follows.
Add a schedule by subclassing `Schedule` and registering it in SCHEDULES. Imports only torch: the samplers
of an exported model read alpha(t) from this same file.
"""

from __future__ import annotations

import math

import torch


class Schedule:
    name: str

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at t: 1 - alpha(t)."""
        return 1 - self.alpha(t)

    def time_at(self, mask_prob: torch.Tensor) -> torch.Tensor:
        """The time whose mask probability is `mask_prob` (inverse of mask_prob): what a time-conditioned network
        reads when a known fraction of its maskable tokens is masked (exact-count training, sampling)."""
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight -alpha'(t) / (1 - alpha(t)); integrates the per-masked-token loss to the NELBO."""
        return -self.alpha_prime(t) / (1 - self.alpha(t))


class LogLinear(Schedule):
    """alpha(t) = 1 - t (MDLM's log-linear schedule): w(t) = 1/t."""

    name = "loglinear"

    def alpha(self, t):
        return 1 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)

    def time_at(self, mask_prob):
        return mask_prob


class Cosine(Schedule):
    """alpha(t) = 1 - cos(pi/2 (1 - t)) (MD4's cosine schedule)."""

    name = "cosine"

    def alpha(self, t):
        return 1 - torch.cos(math.pi / 2 * (1 - t))

    def alpha_prime(self, t):
        return -math.pi / 2 * torch.sin(math.pi / 2 * (1 - t))

    def time_at(self, mask_prob):
        return 1 - torch.acos(mask_prob) * (2 / math.pi)


SCHEDULES: dict[str, type[Schedule]] = {s.name: s for s in (LogLinear, Cosine)}


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; allowed: {sorted(SCHEDULES)}")
    return SCHEDULES[name]()


def sample_times(batch: int, eps: float, antithetic: bool, generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
    """t in (eps, 1] for each sample: [B].

    Antithetic (low-discrepancy, MDLM): one uniform offset u and t_i = (u + i/B) mod 1, so the batch
    covers the interval evenly and the loss variance drops."""
    u = torch.rand(1 if antithetic else batch, generator=generator, device=device)
    if antithetic:
        u = (u + torch.arange(batch, device=device) / batch) % 1
    return eps + (1 - eps) * (1 - u)  # 1 - u in (0, 1] so t = 1 is reachable and t = eps is not

