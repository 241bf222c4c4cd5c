"""The masked-diffusion objective against answers known in closed form."""

import math

import pytest
import torch

from unmask.config import DiffusionConfig
from unmask.core.schedule import SCHEDULES, get_schedule, sample_times
from unmask.diffusion.autoregressive import Autoregressive
from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import MaskedDiffusion, subs_log_probs

V, MASK, PAD = 50, 4, 0


def tokens(B=64, L=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, V, (B, L), generator=g)


class Oracle(torch.nn.Module):
    """Predicts x0 perfectly: a huge logit on the clean token everywhere."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, xt, t=None):
        return torch.nn.functional.one_hot(self.x0[:, : xt.shape[1]], V).float() * 1e4


class Uniform(torch.nn.Module):
    def forward(self, xt, t=None):
        return torch.zeros(*xt.shape, V)


def objective(**kw):
    return MaskedDiffusion(DiffusionConfig(**kw), MASK, PAD, seed=1)


def test_perfect_model_has_zero_loss():
    x0 = tokens()
    out = objective().loss(Oracle(x0), x0, BatchKey(step=0, global_batch=64))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert out.num_tokens == x0.numel()


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_uniform_model_scores_log_vocab(schedule):
    # Uniform over the V-1 non-mask tokens: E_t[w(t) * (1 - alpha(t))] * log(V-1) = log(V-1).
    x0, obj = tokens(), objective(schedule=schedule, eps=1e-4)
    losses = [obj.loss(Uniform(), x0, BatchKey(step=s, global_batch=64)).loss.item() for s in range(200)]
    mean = sum(losses) / len(losses)
    stderr = torch.tensor(losses).std().item() / math.sqrt(len(losses))
    assert abs(mean - math.log(V - 1)) < 4 * stderr + 0.01, (mean, math.log(V - 1), stderr)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_weight_integrates_to_one(schedule):
    s, t = get_schedule(schedule), torch.linspace(1e-5, 1, 200001, dtype=torch.float64)
    integrand = s.weight(t) * s.mask_prob(t)  # = -alpha'(t)
    assert torch.trapezoid(integrand, t).item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_masking_rate_matches_schedule(schedule):
    obj = objective(schedule=schedule)
    x0 = tokens(B=8, L=4000)
    c = obj.corrupt(x0, BatchKey(step=3, global_batch=8))
    x0_, masked, weight, counts = c.targets
    t = obj.times(BatchKey(step=3, global_batch=8), 8)
    rate = masked.float().mean(1)
    assert torch.allclose(rate, obj.schedule.mask_prob(t), atol=0.03)
    (xt,) = c.inputs
    assert torch.equal(xt[~masked], x0[~masked])  # visible tokens carry over
    assert (xt[masked] == MASK).all()


def test_antithetic_times_cover_the_interval_evenly():
    eps = 1e-3
    for step in range(20):
        t = sample_times(64, eps, antithetic=True, generator=torch.Generator().manual_seed(step))
        assert (t > eps).all() and (t <= 1).all()
        gaps = t.sort().values.diff()
        assert torch.allclose(gaps, torch.full_like(gaps, (1 - eps) / 64), atol=1e-5)
    obj = objective(eps=eps)
    t = obj.times(BatchKey(step=5, global_batch=32), 32).sort().values
    assert torch.allclose(t.diff(), torch.full((31,), (1 - eps) / 32), atol=1e-5)


def test_independent_times_do_not_decide_the_first_mask():
    # antithetic=false: a sample's time and its position-0 mask draw once shared a seed, so position 0 was masked
    # exactly when mask_prob(t) > 1 - t. Given t, it must be masked with probability mask_prob(t), not 0 or 1.
    obj, B = objective(antithetic=False), 2000
    key = BatchKey(step=2, global_batch=B)
    masked = obj.corrupt(tokens(B=B, L=1), key).targets[1][:, 0]
    p = obj.schedule.mask_prob(obj.times(key, B))
    for half in (p > 0.5, p <= 0.5):
        assert masked[half].float().mean().item() == pytest.approx(p[half].mean().item(), abs=0.05)
    # And the time draws stay layout-independent: a sample's t does not depend on the split.
    part = obj.times(BatchKey(step=2, dp_rank=1, dp_world=2, global_batch=B), B // 2)
    assert torch.equal(part, obj.times(key, B)[B // 2:])


def test_noise_is_independent_of_the_data_parallel_split():
    obj, x0 = objective(), tokens(B=8)
    whole = obj.corrupt(x0, BatchKey(step=7, global_batch=8)).inputs[0]
    for rank in range(2):  # rank r holds samples 4r .. 4r+3 of the global batch (the loader's layout)
        part = obj.corrupt(x0[4 * rank:4 * rank + 4], BatchKey(step=7, dp_rank=rank, dp_world=2, global_batch=8))
        assert torch.equal(part.inputs[0], whole[4 * rank:4 * rank + 4])
    for micro in range(2):  # two accumulated micro-batches on one rank: the same split
        part = obj.corrupt(x0[4 * micro:4 * micro + 4], BatchKey(step=7, micro=micro, global_batch=8))
        assert torch.equal(part.inputs[0], whole[4 * micro:4 * micro + 4])


def test_prompt_tokens_are_never_masked():
    obj = objective(prompt_conditioned=True)
    x0 = tokens(B=16, L=64)
    prompt = torch.zeros_like(x0, dtype=torch.bool)
    prompt[:, :20] = True
    for step in range(10):
        c = obj.corrupt(x0, BatchKey(step=step, global_batch=16), prompt_mask=prompt)
        masked, counts = c.targets[1], c.targets[3]
        assert not masked[prompt].any()
        assert (counts == 44).all()  # the loss is normalised over answer tokens only


def test_padding_is_never_masked_nor_counted():
    x0 = tokens(B=4, L=16)
    x0[:, 10:] = PAD
    c = objective().corrupt(x0, BatchKey(step=0, global_batch=4))
    assert not c.targets[1][:, 10:].any()
    assert (c.targets[3] == 10).all()


def test_random_length_crops_some_steps():
    obj = objective(random_length_prob=0.5)
    lengths = {obj.corrupt(tokens(B=2), BatchKey(step=s, global_batch=2)).inputs[0].shape[1] for s in range(40)}
    assert 32 in lengths and len(lengths) > 3


def test_subs_carries_visible_tokens_and_never_predicts_mask():
    xt = torch.tensor([[7, MASK, 9, MASK]])
    lp = subs_log_probs(torch.randn(1, 4, V), xt, MASK)
    assert lp[0, 0, 7] == 0 and lp[0, 2, 9] == 0
    assert torch.isinf(lp[..., MASK]).all()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(1, 4))


def test_eval_terms_are_deterministic_and_layout_independent():
    x0, obj = tokens(B=8), objective()
    model = torch.nn.Sequential(torch.nn.Embedding(V, 16), torch.nn.Linear(16, V))
    a = obj.eval_terms(model, x0, time_samples=3, key=11)
    b = obj.eval_terms(model, x0, time_samples=3, key=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for rank in range(2):  # rank r holds samples 4r .. 4r+3: same per-sample terms as the whole batch
        part = obj.eval_terms(model, x0[4 * rank:4 * rank + 4], 3,
                              BatchKey(step=11, dp_rank=rank, dp_world=2, global_batch=8))
        assert torch.allclose(part[0], a[0][4 * rank:4 * rank + 4], rtol=1e-6)


def test_autoregressive_loss_is_next_token_nll():
    x0 = tokens(B=2, L=8)
    ar = Autoregressive(PAD)
    out = ar.loss(Oracle(torch.cat([x0[:, 1:], x0[:, :1]], 1)), x0)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6) and out.num_tokens == 14
    assert ar.loss(Uniform(), x0).loss.item() == pytest.approx(math.log(V), rel=1e-5)
