"""Uniform-state diffusion (Duo/UDLM) as a training objective, against answers known in closed form: for a network
whose x_theta ignores its input, the expected loss at time t is a finite sum over x_t's law, and the bound is its
average over t; the curriculum's argmax sample follows the uniform-state law of the Gaussian alpha."""

import pytest
import torch
import torch.nn.functional as F

from unmask.config import Config, DiffusionConfig, ModelConfig
from unmask.core import uniform_state as us
from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import build_objective
from unmask.diffusion.uniform import UniformDiffusion
from unmask.model.build import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
V, PAD = 11, 0
EPS = 1e-3


def tokens(B=8, L=16, seed=0, pads=True):
    x0 = torch.randint(1, V, (B, L), generator=torch.Generator().manual_seed(seed))
    if pads:
        x0[0, 10:] = PAD  # a padded row: never noised, never scored
    return x0


class Fixed(torch.nn.Module):
    """x_theta = softmax(logits) whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, xt, t=None):
        return self.logits.float().expand(*xt.shape[:2], V)


class Oracle(torch.nn.Module):
    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, xt, t=None):
        return F.one_hot(self.x0, V).float() * 60.0 - 30.0


def objective(**kw) -> UniformDiffusion:
    return UniformDiffusion(DiffusionConfig(objective="duo", **kw), PAD, V, seed=1)


def expected_integrand(logits, x0, alpha, dalpha):
    """E over x_t ~ q(. | x0) = alpha onehot(x0) + (1 - alpha)/V of the integrand, for a fixed x_theta: [T] for
    alpha, dalpha [T] (float64), a finite sum over the V values of x_t."""
    T = alpha.shape[0]
    total = torch.zeros(T, dtype=torch.float64)
    for y in range(V):
        xt = torch.full((T,), y)
        x0s = torch.full((T,), x0)
        prob = alpha * (y == x0) + (1 - alpha) / V
        stats = us.vocab_stats(logits.expand(T, V), xt, x0s, alpha)
        total += prob * us.nelbo_per_token(*stats, xt, x0s, alpha, dalpha, V)
    return total


def closed_form_loss(logits, x0, curriculum=None):
    """The expected training loss: the mean over t ~ U(eps, 1] (trapezoid on a fine grid) of the per-token
    expectation, averaged over x0's non-pad tokens. `curriculum` (gamma_min, gamma_max): x_t follows the Gaussian's
    alpha(gamma(t)) with d alpha / dt."""
    t = torch.linspace(EPS, 1, 4001, dtype=torch.float64)
    if curriculum is None:
        alpha, dalpha = us.alpha(t), us.alpha_prime(t)
    else:
        lo, hi = curriculum
        alpha, da_dg = us.gaussian_to_uniform(lo + t * (hi - lo), V)
        dalpha = da_dg * (hi - lo)
    per_token = {int(v): float(torch.trapezoid(expected_integrand(logits, int(v), alpha, dalpha), t) / (1 - EPS))
                 for v in x0.unique() if v != PAD}
    kept = x0[x0 != PAD]
    return sum(per_token[int(v)] for v in kept) / len(kept)


def training_losses(obj, model, x0, steps):
    return torch.tensor([obj.loss(model, x0, BatchKey(step=s, global_batch=x0.shape[0])).loss.item()
                         for s in steps], dtype=torch.float64)


@pytest.mark.parametrize("kind", ["uniform", "peaked"])
def test_training_loss_and_eval_agree_with_the_closed_form(kind):
    x0 = tokens()
    g = torch.Generator().manual_seed(2)
    logits = torch.zeros(V, dtype=torch.float64) if kind == "uniform" else 2 * torch.randn(V, generator=g,
                                                                                           dtype=torch.float64)
    model, obj = Fixed(logits), objective()
    want = closed_form_loss(logits, x0)
    losses = training_losses(obj, model, x0, range(300))
    se = losses.std() / len(losses) ** 0.5
    assert abs(losses.mean() - want) < 4 * se + 1e-6, (losses.mean(), want, se)
    terms = obj.eval_terms(model, x0, time_samples=256, key=0)
    assert torch.equal(terms.tokens, (x0 != PAD).sum(1))
    got = terms.nll.sum() / terms.tokens.sum()
    eval_se = terms.mc_var.sum().sqrt() / terms.tokens.sum()
    assert abs(got - want) < 4 * eval_se + 1e-6, (got, want, eval_se)
    # a wrong bound (the t-integral missing its weight, or x_t's law off) would be far: the check has teeth
    assert se < 0.05 * want and eval_se < 0.1 * want


def test_curriculum_loss_agrees_with_the_gaussian_closed_form():
    """During the curriculum x_t = argmax(a_g onehot + s_g eps) follows the uniform-state law of
    alpha(gamma(t)): the expected loss of a fixed network is the closed form at that alpha and d alpha / dt."""
    x0 = tokens()
    logits = 2 * torch.randn(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    obj = objective(curriculum_end=10_000)
    want = closed_form_loss(logits, x0, curriculum=(-3.5, -1.75))
    losses = training_losses(obj, Fixed(logits), x0, range(300))
    se = losses.std() / len(losses) ** 0.5
    assert abs(losses.mean() - want) < 4 * se + 1e-6, (losses.mean(), want, se)
    assert abs(want - closed_form_loss(logits, x0)) > 10 * se  # the two processes are told apart


@pytest.mark.parametrize("curriculum_end", [0, 100])
def test_an_oracle_pays_nothing(curriculum_end):
    x0 = tokens()
    obj = objective(curriculum_end=curriculum_end)
    for step in range(5):
        assert obj.loss(Oracle(x0), x0, BatchKey(step=step, global_batch=8)).loss.item() == pytest.approx(0, abs=1e-8)
    terms = obj.eval_terms(Oracle(x0), x0, 4, key=0, accuracy=True)
    assert terms.nll.abs().max() < 1e-8
    # accuracy is scored at every non-pad position of every draw
    assert torch.equal(terms.predicted, 4 * (x0 != PAD).sum(1)) and torch.equal(terms.hits, terms.predicted)
    uniform = obj.eval_terms(Fixed(torch.zeros(V)), x0, 4, key=0, accuracy=True)
    assert torch.equal(uniform.predicted, terms.predicted) and (uniform.hits < uniform.predicted).all()


def test_forward_process_resamples_uniformly_and_never_touches_pads():
    x0 = tokens(B=64, L=64)
    obj = objective()
    changed, drawn = [], torch.zeros(V)
    for step in range(20):
        c = obj.corrupt(x0, BatchKey(step=step, global_batch=64))
        xt, t = c.inputs
        assert xt.dtype == torch.long and t.shape == (64,)
        assert torch.equal(xt[x0 == PAD], x0[x0 == PAD])
        alpha = us.alpha(t.double())
        # per row: P(x_t != x_0) = (1 - alpha)(1 - 1/V)
        changed.append(((xt != x0) & (x0 != PAD)).sum(1).double() / (x0 != PAD).sum(1)
                       - (1 - alpha) * (1 - 1 / V))
        drawn += torch.bincount(xt[(xt != x0)], minlength=V).double()
    assert abs(torch.cat(changed).mean()) < 0.01
    share = drawn / drawn.sum()  # replacements cover the whole vocabulary (pad and x0's own value included)
    assert (share > 0.5 / V).all()


def test_layout_independence_micro_batches_and_ranks():
    """One micro-batch of 8 samples, two micro-batches of 4, or two data-parallel ranks of 4 give the same
    per-token sum (the losses are per-micro-batch token means), with and without the curriculum."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", vocab_size=V, time_conditioning=True))
    x0 = tokens()
    step = 3
    for obj in (objective(), objective(curriculum_end=10)):
        whole = obj.loss(model, x0, BatchKey(step=step, global_batch=8))
        whole_sum = whole.loss.item() * whole.num_tokens
        for key_of in (lambda i: BatchKey(step, micro=i, global_batch=8),
                       lambda i: BatchKey(step, dp_rank=i, dp_world=2, global_batch=8)):
            parts = [obj.loss(model, x0[4 * i:4 * i + 4], key_of(i)) for i in range(2)]
            assert sum(p.loss.item() * p.num_tokens for p in parts) == pytest.approx(whole_sum, rel=1e-5)
        terms = obj.eval_terms(model, x0, 3, BatchKey(7, global_batch=8))
        halves = [obj.eval_terms(model, x0[4 * i:4 * i + 4], 3, BatchKey(7, micro=i, global_batch=8))
                  for i in range(2)]
        torch.testing.assert_close(torch.cat([h.nll for h in halves]), terms.nll)


def test_curriculum_schedule_and_inputs():
    obj = objective(curriculum_start=2, curriculum_end=6)
    assert [obj.curriculum(s) for s in (0, 1, 2)] == pytest.approx([0.1, 0.1, 0.1])
    assert obj.curriculum(4) == pytest.approx(10 ** -1.5)
    assert obj.curriculum(5) == pytest.approx(10 ** -1.75)
    assert obj.curriculum(6) is None and obj.curriculum(100) is None
    assert objective().curriculum(0) is None  # curriculum_end = 0: the plain ELBO from step 0

    x0 = tokens()
    for step in range(8):
        c = obj.corrupt(x0, BatchKey(step=step, global_batch=8))
        soft, t = c.inputs
        _, xt, alpha, dalpha = c.targets
        if step >= 6:
            assert soft.dtype == torch.long
            continue
        assert soft.shape == (8, 16, V) and soft.dtype == torch.float32
        torch.testing.assert_close(soft.sum(-1), torch.ones(8, 16))
        assert torch.equal(soft[x0 == PAD], F.one_hot(x0[x0 == PAD], V).float())  # pads: one-hot pad
        assert torch.equal(soft.argmax(-1), xt)  # the soft input's mode is the scored x_t
        # sharper as tau falls: the mode's mass at step 5 (tau = 10^-1.75) beats step 0's (tau = 0.1)
        mass = soft.max(-1).values[x0 != PAD].mean()
        if step == 0:
            first = mass
        if step == 5:
            assert mass > first
        torch.testing.assert_close(t.double(), us.time_of(alpha), rtol=1e-6, atol=1e-7)  # network reads Gaussian's t
        assert (dalpha < 0).all() and ((alpha > 0) & (alpha < 1)).all()


def test_soft_one_hot_input_is_the_token_input():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", vocab_size=V, time_conditioning=True)).eval()
    x0, t = tokens(B=2), torch.tensor([0.3, 0.8])
    torch.testing.assert_close(model(F.one_hot(x0, V).float(), t), model(x0, t))


def test_saved_config_round_trips():
    """A run's config is saved as TOML (pairs become arrays) and read back on resume and by eval."""
    from unmask.config import load_config_text

    cfg = Config(diffusion=DiffusionConfig(objective="duo", curriculum_end=8, curriculum_gamma=(-3.0, -1.5)),
                 model=ModelConfig(size="tiny", time_conditioning=True))
    assert load_config_text(cfg.to_toml(), "test") == cfg


def test_build_objective_and_config_errors():
    cfg = DiffusionConfig(objective="duo")
    assert isinstance(build_objective(cfg, 4, PAD, vocab_size=V), UniformDiffusion)
    with pytest.raises(ValueError, match="vocab_size"):
        build_objective(cfg, 4, PAD)
    with pytest.raises(ValueError, match="model.time_conditioning=true"):
        Config(diffusion=cfg, model=ModelConfig(size="tiny", time_conditioning=False))
    Config(diffusion=cfg, model=ModelConfig(size="tiny", time_conditioning=True))
    with pytest.raises(ValueError, match="arch='unmask'"):
        Config(diffusion=cfg, model=ModelConfig(size="tiny", arch="bert", time_conditioning=False, n_kv_heads=4))
    for bad in ({"estimator": "exact_count"}, {"clip": (0.2, 0.8)}, {"schedule": "cosine"},
                {"random_length_prob": 0.1}):
        with pytest.raises(ValueError, match=f"diffusion.{next(iter(bad))}="):
            DiffusionConfig(objective="duo", **bad)
    for bad in ({"prompt_conditioned": True}, {"token_reweighting": "cart"}):
        with pytest.raises(ValueError, match="objective"):
            DiffusionConfig(objective="duo", **bad)
    # AR adaptation into duo (shift, annealed attention) is accepted; an AR run is refused the annealing
    Config(diffusion=DiffusionConfig(objective="duo", anneal_steps=5),
           model=ModelConfig(size="tiny", time_conditioning=True, shift_logits=True))
    with pytest.raises(ValueError, match="anneal_steps"):
        Config(diffusion=DiffusionConfig(objective="ar", anneal_steps=5), model=ModelConfig(size="tiny"))
    for end in (5, 0):  # a start without a later end means nothing
        with pytest.raises(ValueError, match="curriculum_start=5 must be below"):
            DiffusionConfig(objective="duo", curriculum_start=5, curriculum_end=end)
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        DiffusionConfig(objective="duo", curriculum_gamma=(-1.0, -2.0))
    for key, value in (("curriculum_end", 10), ("curriculum_tau_log10", (-1.0, -3.0))):
        with pytest.raises(ValueError, match=f"diffusion.{key} configures Duo's curriculum"):
            DiffusionConfig(**{key: value})
