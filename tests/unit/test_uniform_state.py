"""The uniform-state (UDLM / Duo) math in unmask.core.uniform_state, checked against definitions computed apart:
the NELBO integrand is the limit of the posterior KL per unit time, the Gaussian map is the argmax frequency."""

import pytest
import torch
import torch.nn.functional as F

from unmask.core import uniform_state as us

V = 7


@pytest.mark.parametrize("t", [0.05, 0.37, 0.9])
@pytest.mark.parametrize("same", [True, False])
def test_integrand_is_the_limit_of_the_posterior_kl(t, same):
    """d/ds of KL(q(x_s | x_t, x_0) || q(x_s | x_t, x_theta)) summed over steps: the integrand per unit time."""
    g = torch.Generator().manual_seed(int(t * 100) + same)
    x0 = torch.randint(V, (5,), generator=g)
    xt = x0.clone() if same else (x0 + 1 + torch.randint(V - 1, (5,), generator=g)) % V
    logits = torch.randn(5, V, generator=g, dtype=torch.float64)
    tt = torch.full((5,), t, dtype=torch.float64)
    a, dt = us.alpha(tt), 1e-6
    integrand = us.nelbo_per_token(*us.vocab_stats(logits, xt, x0, a), xt, x0, a, us.alpha_prime(tt), V)
    a_s = us.alpha(tt - dt)[:, None]
    q = us.posterior(F.one_hot(x0, V).double(), xt, a_s, a[:, None])
    p = us.posterior(logits.softmax(-1), xt, a_s, a[:, None])
    kl = (q * (q.clamp_min(1e-300).log() - p.log())).sum(-1) / dt
    torch.testing.assert_close(integrand, kl, rtol=1e-5, atol=1e-6)
    assert (integrand > 0).all()


def test_a_perfect_denoiser_pays_nothing():
    x0 = torch.arange(V)
    logits = torch.full((V, V), -60.0, dtype=torch.float64).fill_diagonal_(60.0)
    for xt in (x0, (x0 + 3) % V):
        a = torch.full((V,), 0.4, dtype=torch.float64)
        loss = us.nelbo_per_token(*us.vocab_stats(logits, xt, x0, a), xt, x0, a, us.alpha_prime(a), V)
        torch.testing.assert_close(loss, torch.zeros_like(loss), atol=1e-9, rtol=0)


def test_posterior_is_a_distribution_that_keeps_x_t_at_s_equal_t():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, V, generator=g, dtype=torch.float64).softmax(-1)
    xt = torch.randint(V, (4,), generator=g)
    a_t = torch.full((4, 1), 0.3, dtype=torch.float64)
    post = us.posterior(p0, xt, torch.full_like(a_t, 0.6), a_t)
    torch.testing.assert_close(post.sum(-1), torch.ones(4, dtype=torch.float64))
    assert (post >= 0).all()
    torch.testing.assert_close(us.posterior(p0, xt, a_t, a_t), F.one_hot(xt, V).double())


def test_gaussian_map_matches_argmax_frequency_and_its_derivative():
    gamma = torch.tensor([-3.5, -2.5, -1.75], dtype=torch.float64)
    alpha, dalpha = us.gaussian_to_uniform(gamma, 50)
    g = torch.Generator().manual_seed(0)
    n = 100_000
    for gi, ai in zip(gamma, alpha, strict=True):
        a_g, s_g = us.gaussian_scales(gi)
        x = a_g * F.one_hot(torch.zeros(n, dtype=torch.long), 50) + s_g * torch.randn(n, 50, generator=g,
                                                                                      dtype=torch.float64)
        hit = (x.argmax(-1) == 0).double().mean()
        freq = (50 * hit - 1) / 49
        assert abs(float(freq - ai)) < 4 * float((hit * (1 - hit) / n).sqrt()) * 50 / 49 + 1e-4
    h = 1e-4
    numeric = (us.gaussian_to_uniform(gamma + h, 50)[0] - us.gaussian_to_uniform(gamma - h, 50)[0]) / (2 * h)
    torch.testing.assert_close(dalpha, numeric, rtol=1e-4, atol=1e-6)
    assert (alpha[:-1] > alpha[1:]).all() and (dalpha < 0).all()
