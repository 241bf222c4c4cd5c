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


# --- the exact-count estimator (LLaDA's likelihood estimator) beside the continuous one ---

class Context(torch.nn.Module):
    """A fixed random network whose CE depends on which tokens are visible, so the estimators have variance."""

    def __init__(self, vocab=V):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.emb = torch.nn.Parameter(torch.randn(vocab, 8, generator=g))
        self.out = torch.nn.Parameter(torch.randn(16, vocab, generator=g) * 0.3)

    def forward(self, xt, t=None):
        e = self.emb[xt]  # [B, L, 8]
        return torch.cat([e, e.mean(1, keepdim=True).expand_as(e) * 4], -1) @ self.out


@torch.no_grad()
def exact_nelbo(model, x0):
    """NELBO per token by enumeration, from the any-order identity NELBO = sum_k (1/k) E_{|M|=k}[sum_{i in M} CE_i]."""
    B, L = x0.shape
    total = 0.0
    for bits in range(1, 2**L):
        m = torch.tensor([(bits >> i) & 1 for i in range(L)], dtype=torch.bool).expand(B, L)
        k = int(m[0].sum())
        logits = model(torch.where(m, MASK, x0)).float()
        logits[..., MASK] = float("-inf")
        ce = torch.nn.functional.cross_entropy(logits[m], x0[m], reduction="sum")
        total += ce.item() / k / math.comb(L, k)
    return total / (B * L)


def losses_over_steps(obj, model, x0, steps, **kw):
    B = x0.shape[0]
    return torch.tensor([obj.loss(model, x0, BatchKey(step=s, global_batch=B), **kw).loss.item() for s in range(steps)])


@pytest.mark.parametrize("estimator", ["continuous", "exact_count"])
def test_both_estimators_are_unbiased_for_a_context_dependent_model(estimator):
    x0, model = tokens(B=32, L=6, seed=3), Context()
    exact = exact_nelbo(model, x0)
    losses = losses_over_steps(objective(estimator=estimator, eps=1e-5), model, x0, 300)
    stderr = losses.std().item() / math.sqrt(len(losses))
    assert abs(losses.mean().item() - exact) < 4 * stderr, (estimator, losses.mean().item(), exact, stderr)


def test_exact_count_scores_a_uniform_model_exactly_log_vocab_every_step():
    # n/k weight times k masked tokens of CE log(V-1) each: exactly n log(V-1) per row, so no variance at all.
    x0 = tokens(B=16, L=32)
    x0[:5, 20:] = PAD
    prompt = torch.zeros_like(x0, dtype=torch.bool)
    prompt[8:, :7] = True
    obj = objective(estimator="exact_count", prompt_conditioned=True)
    losses = losses_over_steps(obj, Uniform(), x0, 20, prompt_mask=prompt)
    assert torch.allclose(losses, torch.full_like(losses, math.log(V - 1)), atol=1e-5)
    assert obj.loss(Oracle(x0), x0, BatchKey(step=0, global_batch=16)).loss.item() == pytest.approx(0.0, abs=1e-6)


def test_exact_count_has_at_least_half_the_spread_of_the_continuous_loss():
    x0, model = tokens(B=16, L=32, seed=4), Context()
    cont = losses_over_steps(objective(), model, x0, 200).std().item()
    exact = losses_over_steps(objective(estimator="exact_count"), model, x0, 200).std().item()
    print(f"\nloss std over 200 steps: continuous {cont:.4f}, exact_count {exact:.4f} ({cont / exact:.1f}x)")
    assert 2 * exact <= cont


def test_exact_count_masks_exactly_k_whatever_the_split():
    obj = MaskedDiffusion(DiffusionConfig(estimator="exact_count", prompt_conditioned=True), MASK, PAD, seed=1,
                          time_conditioned=True)
    x0 = tokens(B=8, L=32)
    x0[2, 9:] = PAD
    x0[3] = PAD  # nothing to mask: k = 0
    prompt = torch.zeros_like(x0, dtype=torch.bool)
    prompt[4:, :5] = True
    key = BatchKey(step=7, global_batch=8)
    c = obj.corrupt(x0, key, prompt)
    (xt, t), (_, masked, weight, n) = c.inputs, c.targets
    k = torch.minimum(n, (obj.fractions(key, 8)[:, 0] * n).floor().long() + 1)
    assert n.tolist() == [32, 32, 9, 0, 27, 27, 27, 27] and torch.equal(masked.sum(1), k)
    assert not masked[prompt | (x0 == PAD)].any() and (xt[masked] == MASK).all()
    assert torch.allclose(t, k / n.clamp_min(1)) and torch.allclose(weight[n > 0], (n / k)[n > 0].float())
    for rank in range(2):  # the data-parallel split and the micro-batch split give each sample the same masks
        for part in (BatchKey(step=7, dp_rank=rank, dp_world=2, global_batch=8),
                     BatchKey(step=7, micro=rank, global_batch=8)):
            rows = slice(4 * rank, 4 * rank + 4)
            assert torch.equal(obj.corrupt(x0[rows], part, prompt[rows]).targets[1], masked[rows])


def test_exact_count_k_is_uniform_and_survives_random_length_crops():
    obj = objective(estimator="exact_count", random_length_prob=0.5)
    counts = torch.zeros(9)
    for s in range(40):
        c = obj.corrupt(tokens(B=64, L=8), BatchKey(step=s, global_batch=64))
        masked, n = c.targets[1], c.targets[3]
        assert (masked.sum(1) >= 1).all() and (masked.sum(1) <= n).all()
        if masked.shape[1] == 8:
            counts += torch.bincount(masked.sum(1), minlength=9)
    share = counts[1:] / counts.sum()  # antithetic over the batch: each k in 1..8 takes 1/8 of the rows
    assert torch.allclose(share, torch.full((8,), 1 / 8), atol=0.01), share


def test_eval_terms_are_unbiased_and_their_standard_error_is_conservative():
    x0, model, obj = tokens(B=32, L=6, seed=3), Context(), objective()
    exact = exact_nelbo(model, x0)
    est, se = [], []
    for s in range(60):
        terms = obj.eval_terms(model, x0, 4, s)
        est.append(float(terms.nll.sum() / terms.tokens.sum()))
        se.append(math.sqrt(float(terms.mc_var.sum())) / float(terms.tokens.sum()))
    est = torch.tensor(est)
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / math.sqrt(len(est))
    assert 0 < est.std().item() <= 1.2 * sum(se) / len(se), (est.std().item(), sum(se) / len(se))


def validation_row(objective_, model):
    from types import SimpleNamespace

    from unmask.config import Config
    from unmask.train.validation import validate

    class Engine:
        def eval_terms(self, x0, time_samples, key):
            return objective_.eval_terms(model, x0, time_samples, key)

        def all_reduce_dp(self, values):
            return values

    cfg = Config.model_validate({"train": {"micro_batch_size": 8, "seq_len": 16}})
    dims = SimpleNamespace(dp_rank=0, dp=1)
    return validate(Engine(), [tokens(B=8, L=16, seed=s) for s in range(2)], cfg, dims, PAD)


def test_validation_reports_the_standard_error_of_its_estimate():
    row = validation_row(objective(), Context())
    assert 0 < row["val_nelbo_se"] < 0.1 * row["val_nelbo"], row
    assert validation_row(Autoregressive(PAD), Context())["val_nelbo_se"] == 0


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_time_at_inverts_the_mask_probability(schedule):
    s, p = get_schedule(schedule), torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(s.mask_prob(s.time_at(p)), p, atol=1e-9)
