"""Uniform-state discrete diffusion (UDLM, Schiff et al. 2025; Duo, Sahoo et al. 2025): the math that training,
the samplers and Duo's consistency distillation share.

Noise replaces a token by one drawn uniformly from the whole vocabulary of V tokens (there is no `<mask>`):
q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t) / V, with Duo's log-linear schedule
alpha_t = 1 - (1 - eps) t (s-sahoo/duo `trainer_base.LogLinear`: alpha stays >= eps, where the ELBO weight is finite).

Duo's curriculum and DCD read the same process through a Gaussian one: x = a_g onehot(x_0) + s_g eps with
a_g^2 = sigmoid(-gamma), s_g^2 = sigmoid(gamma); argmax(x) is then a uniform-state sample whose alpha is
(V I(mu) - 1) / (V - 1), I(mu) = P(argmax = x_0) = int phi(z - mu) Phi(z)^(V-1) dz, mu = a_g / s_g = exp(-gamma/2)
(Duo eq. 10; `algo.DUO._gamma_to_alphat_integral` reads it from a table per tokenizer, here it is integrated
on the fly). Imports only torch (see unmask.core).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-3  # Duo's noise.eps: alpha_1 = EPS, not 0


def alpha(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """alpha_t = 1 - (1 - eps) t: the probability that a token is still its clean value (not resampled)."""
    return 1 - (1 - eps) * t


def alpha_prime(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return torch.full_like(t, -(1 - eps))


def time_of(alpha_t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The log-linear time whose alpha is `alpha_t`: what a time-conditioned network reads for any alpha (the
    curriculum's Gaussian-derived ones included)."""
    return (1 - alpha_t) / (1 - eps)


def nelbo_per_token(sum_log_xbar: torch.Tensor, xbar_xt: torch.Tensor, xbar_x0: torch.Tensor, xt: torch.Tensor,
                    x0: torch.Tensor, alpha_t: torch.Tensor, dalpha_t: torch.Tensor, vocab: int) -> torch.Tensor:
    """UDLM's continuous-time NELBO integrand per token (s-sahoo/duo `DUO_BASE.nll_per_token`), from the three
    vocabulary reductions of the model's x_theta = softmax(logits), with xbar = V alpha_t x_theta + 1 - alpha_t:
    sum_log_xbar = sum_y log xbar(y), xbar_xt = xbar(x_t), xbar_x0 = xbar(x_0). Every argument is [...] (one
    value per token); the reductions are computed apart (`vocab_stats`) so a vocabulary-sharded head can
    all-reduce them. Returns the integrand [...] (float64 in, float64 out): the NELBO is its integral over t.
    Positions where x_t = x_0 and where they differ use the two branches of the closed form."""
    V = vocab
    same = (x0 == xt).to(alpha_t.dtype)
    differ = 1 - same
    coeff = dalpha_t / (V * alpha_t)
    xbar_true_xt = (1 - alpha_t) + V * alpha_t * same  # the same quantity for x_theta = onehot(x_0)
    term1 = V * (1 / xbar_true_xt - 1 / xbar_xt)
    const = (1 - alpha_t) / (V * alpha_t + 1 - alpha_t)
    coefs = same * const + differ
    offset = ((V - 1) * const * same - differ / const) * const.log()
    theta = -coefs * (sum_log_xbar - V * xbar_xt.log())
    theta = theta - V * alpha_t / (1 - alpha_t) * (xbar_x0.log() - xbar_xt.log()) * differ
    return coeff * (term1 - (theta + offset))


def vocab_stats(logits: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor):
    """(sum_log_xbar, xbar_xt, xbar_x0) of `nelbo_per_token` from full-vocabulary logits [..., V] (float64)."""
    V = logits.shape[-1]
    a = alpha_t.double()[..., None]
    xbar = V * a * logits.double().softmax(-1) + 1 - a  # [..., V]
    return (xbar.log().sum(-1), xbar.gather(-1, xt[..., None])[..., 0], xbar.gather(-1, x0[..., None])[..., 0])


def posterior(p0: torch.Tensor, xt: torch.Tensor, alpha_s: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """q(x_s | x_t, x_0) [..., V] for x_0 ~ p0 [..., V] (a one-hot x_0, or the model's x_theta), alpha_s [..., 1] >=
    alpha_t [..., 1] (s-sahoo/duo `DUO_BASE._posterior_from_x0`)."""
    V = p0.shape[-1]
    onehot = torch.nn.functional.one_hot(xt, V).to(p0.dtype)
    ratio = alpha_t / alpha_s
    numerator = (alpha_t * V * p0 * onehot + (ratio - alpha_t) * onehot + (alpha_s - alpha_t) * p0
                 + (1 - ratio) * (1 - alpha_s) / V)
    return numerator / (alpha_t * V * p0.gather(-1, xt[..., None]) + 1 - alpha_t)


# Gaussian relaxation (Duo): gamma is linear in t between gamma_min and gamma_max.
_Z = torch.linspace(-14.0, 26.0, 8001, dtype=torch.float64)  # quadrature grid; phi(z - mu) Phi(z)^(V-1) lives in it


def gaussian_scales(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_g, s_g) of x = a_g onehot + s_g eps: a_g^2 = sigmoid(-gamma), s_g^2 = sigmoid(gamma)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def gaussian_to_uniform(gamma: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, d alpha / d gamma) of the uniform-state process that argmax(a_g onehot(x_0) + s_g eps) follows,
    float64 [...] for gamma [...]. By trapezoidal quadrature of I(mu) = int phi(z - mu) Phi(z)^(V-1) dz and its
    mu-derivative int (z - mu) phi(z - mu) Phi(z)^(V-1) dz, mu = exp(-gamma / 2), over a fixed grid in log space
    (Phi^(V-1) underflows otherwise)."""
    g = gamma.double()
    mu = (-g / 2).exp()[..., None]  # [..., 1]
    z = _Z.to(g.device)
    dz = float(z[1] - z[0])
    log_phi = -0.5 * (z - mu) ** 2 - 0.5 * math.log(2 * math.pi)
    density = (log_phi + (vocab - 1) * torch.special.log_ndtr(z)).exp()  # [..., Z]
    integral = torch.trapezoid(density, dx=dz, dim=-1)
    d_integral = torch.trapezoid((z - mu) * density, dx=dz, dim=-1)  # d I / d mu
    scale = vocab / (vocab - 1)
    return scale * integral - 1 / (vocab - 1), scale * d_integral * (-mu[..., 0] / 2)
