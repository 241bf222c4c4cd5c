"""The uniform-state (Duo) sampler behind `generate(..., process="uniform")`.

Exactness: a network whose prediction x_theta = p ignores its input is the exact denoiser of data made of independent
tokens ~ p (q(x_s | x_t, x_0 ~ p) is then the true reverse marginal of each token), so ancestral sampling with any
number of steps draws each generated position from p, up to the prior's start (uniform, where q(x_1) is
eps p + (1 - eps) / V: a total-variation gap of at most 1e-3, far below what the frequency test sees). The same holds
for the filtered p with temperature / top-k / top-p. A posterior without its uniform term fails the same test."""

import pytest
import torch
from scipy.stats import chisquare

import unmask.core.uniform_sampling as uniform_sampling
from unmask.config import ModelConfig
from unmask.core.sampling import SamplerOptions, generate
from unmask.core.sampling_steps import filter_logits
from unmask.core.schedule import get_schedule
from unmask.core.uniform_sampling import T_END, time_grid
from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig, SamplingError, sample
from unmask.diffusion.sampler_template import infill_template
from unmask.model.build import build_model

SP = SpecialTokens()
LOGITS = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, 0.5, 1.5, -2.0])  # V = 8, every token likely enough to count
V, MASK, FIXED = 8, 7, 0
LOGLINEAR = get_schedule("loglinear")

pytestmark = pytest.mark.usefixtures("one_thread")


class FixedPrediction(torch.nn.Module):
    """x_theta = softmax(LOGITS) at every position, whatever the input; keeps the times it was called at."""

    def __init__(self, logits=LOGITS):
        super().__init__()
        self.logits, self.times = logits, []
        self.cfg = ModelConfig(size="tiny", vocab_size=logits.numel(), time_conditioning=True)

    def forward(self, x, t=None):
        self.times.append(t.clone())
        return self.logits.expand(*x.shape, -1)


class Recorder(torch.nn.Module):
    """Passes through to a model, keeping every (input, time, logits)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def forward(self, x, t=None):
        out = self.model(x, t)
        self.calls.append((x.clone(), t.clone(), out.clone()))
        return out


def draw(model, rows=4000, length=4, **options):
    """`rows` samples of a template [FIXED, <mask> * length]: the generated tokens [rows * length] and the output."""
    template = torch.full((rows, length + 1), MASK)
    template[:, 0] = FIXED
    out = generate(model, template, SamplerOptions(**options), MASK, 1, 2, LOGLINEAR, True, process="uniform")
    return out[0][:, 1:].flatten(), out


def chi2_pvalue(tokens, probs):
    counts, probs = torch.bincount(tokens, minlength=probs.numel()).double(), probs.double()
    keep = probs > 0  # filtered-out tokens must never appear at all
    assert counts[~keep].sum() == 0
    return chisquare(counts[keep].numpy(), (probs[keep] / probs[keep].sum() * counts.sum()).numpy()).pvalue


@pytest.mark.parametrize("steps", [1, 2, 5, 32])
def test_ancestral_sampling_of_a_fixed_prediction_draws_from_it_at_any_step_count(steps):
    tokens, _ = draw(FixedPrediction(), steps=steps, noise_removal="ancestral", seed=steps)
    assert chi2_pvalue(tokens, LOGITS.softmax(-1)) > 1e-4


@pytest.mark.parametrize("knobs", [dict(temperature=0.5), dict(top_k=3), dict(top_p=0.8, temperature=1.5)])
def test_temperature_and_filters_act_on_the_prediction_before_the_posterior(knobs):
    tokens, _ = draw(FixedPrediction(), steps=4, noise_removal="ancestral", **knobs)
    expected = filter_logits(LOGITS[None].double() / knobs.get("temperature", 1.0), knobs.get("top_k", 0),
                             knobs.get("top_p", 1.0)).softmax(-1)[0]
    assert chi2_pvalue(tokens, expected) > 1e-4


def test_the_frequency_test_catches_a_posterior_without_its_uniform_term(monkeypatch):
    """The test above has power: drop the (1 - alpha_t / alpha_s)(1 - alpha_s) / V term of q(x_s | x_t, x_0) (and
    renormalise) and the samples no longer follow p."""
    right = uniform_sampling.posterior

    def no_uniform_term(p0, xt, alpha_s, alpha_t):
        onehot = torch.nn.functional.one_hot(xt, p0.shape[-1]).to(p0.dtype)
        q = alpha_t * p0.shape[-1] * p0 * onehot + (alpha_t / alpha_s - alpha_t) * onehot + (alpha_s - alpha_t) * p0
        return q / q.sum(-1, keepdim=True)

    p = LOGITS.softmax(-1)
    assert chi2_pvalue(draw(FixedPrediction(), steps=5, noise_removal="ancestral", seed=5)[0], p) > 1e-4
    monkeypatch.setattr(uniform_sampling, "posterior", no_uniform_term)
    assert right is not no_uniform_term
    assert chi2_pvalue(draw(FixedPrediction(), steps=5, noise_removal="ancestral", seed=5)[0], p) < 1e-6


@pytest.mark.parametrize("noise_removal", ["greedy", "ancestral", None])
def test_the_network_reads_the_time_grid_and_nfe_counts_every_call(noise_removal):
    model = FixedPrediction()
    _, (_, _, nfe, steps) = draw(model, rows=2, steps=4, noise_removal=noise_removal)
    assert (nfe, steps) == (5, 4)  # four posterior steps and the noise removal at the grid's end
    grid = time_grid(4)
    assert grid[0] == 1 and abs(float(grid[-1]) - T_END) < 1e-12
    for t, expected in zip(model.times, grid, strict=True):
        assert t.shape == (2,) and torch.allclose(t.double(), expected.expand(2), atol=1e-7)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", time_conditioning=True)).eval()
    with torch.no_grad():  # random weights everywhere, so the prediction depends on the input and the time
        for p in model.parameters():
            p.normal_(std=0.2 if p.ndim > 1 else 1.0)
    return model


def infill():
    return infill_template([[[10, 11, 12], 6, [20, 21], 9, [30, 31]], [[40], 12, [41]]], SP)[0]


def test_greedy_tail_ends_on_the_argmax_of_the_last_prediction(tiny):
    template = infill()
    model = Recorder(tiny)
    result = sample(model, template, SamplerConfig(steps=6, seed=3), SP, process="uniform")  # greedy by default
    x_last, t_last, logits = model.calls[-1]
    generated = template == SP.mask
    assert len(model.calls) == result.nfe == 7 and torch.allclose(t_last, torch.full((2,), T_END))
    assert torch.equal(result.tokens[generated], logits.argmax(-1)[generated])
    assert torch.equal(result.tokens[~generated], template[~generated])
    # the ancestral tail draws from the posterior instead: the same seed, a different end
    ancestral = sample(tiny, template, SamplerConfig(steps=6, seed=3, noise_removal="ancestral"), SP,
                       process="uniform")
    assert not torch.equal(ancestral.tokens, result.tokens)


@pytest.mark.parametrize("options", [dict(steps=8), dict(steps=3, noise_removal="ancestral", top_p=0.9),
                                     dict(steps=4, temperature=0.0)])
def test_fixed_positions_never_change_and_a_seed_fixes_the_samples(tiny, options):
    template = infill()
    fixed = template != SP.mask
    model = Recorder(tiny)
    first = sample(model, template, SamplerConfig(seed=1, **options), SP, process="uniform")
    for x, _, _ in model.calls:  # the network's every input keeps the template's fixed tokens
        assert torch.equal(x[fixed], template[fixed])
    assert (model.calls[0][0][~fixed] != SP.mask).any()  # masks start as vocabulary tokens, not <mask>
    assert int(first.tokens.max()) < tiny.cfg.vocab_size
    again = sample(tiny, template, SamplerConfig(seed=1, **options), SP, process="uniform")
    other = sample(tiny, template, SamplerConfig(seed=2, **options), SP, process="uniform")
    assert torch.equal(first.tokens, again.tokens) and not torch.equal(first.tokens, other.tokens)


def test_the_prior_is_uniform_over_the_whole_vocabulary():
    model = Recorder(FixedPrediction())
    draw(model, rows=2000, length=8, steps=1)
    start = model.calls[0][0][:, 1:].flatten()
    assert chi2_pvalue(start, torch.full((V,), 1.0 / V)) > 1e-4


def test_stop_at_eos_cuts_after_the_first_generated_eos():
    logits = LOGITS.clone()
    logits[SP.eos] = 2.5  # <eos> likely at every position, yet not the argmax: the ancestral tail draws it
    template = torch.full((64, 9), MASK)
    template[:, 0] = FIXED
    options = SamplerOptions(steps=2, stop_at_eos=True, noise_removal="ancestral")
    out = generate(FixedPrediction(logits), template, options, MASK, SP.eos, SP.pad, LOGLINEAR, True, process="uniform")
    tokens, lengths = out[0], out[1]
    assert (lengths < 9).any() and (lengths == 9).any()
    for row, n in zip(tokens, lengths, strict=True):
        assert SP.eos not in row[1:n].tolist() and (n == 9 or row[n] == SP.eos)
        assert (row[n + 1:] == SP.pad).all()


@pytest.mark.parametrize(("options", "match"), [
    (dict(kind="remask"), "kind='remask' decodes a masked-diffusion model"),
    (dict(kind="threshold"), "use kind='ancestral'"),
    (dict(block_length=4), "block_length=4: the uniform-state sampler denoises the whole sequence"),
    (dict(kv_cache="prefix"), "kv_cache='prefix': every position"),
    (dict(guidance=1.0), "guidance=1.0: classifier-free guidance masks the prompt"),
])
def test_what_does_not_apply_to_a_uniform_state_model_is_refused(tiny, options, match):
    with pytest.raises(SamplingError, match=match):
        sample(tiny, infill(), SamplerConfig(**options), SP, process="uniform")
    with pytest.raises(ValueError, match=match):  # the core entry point says the same
        generate(tiny, infill(), SamplerOptions(**options), SP.mask, SP.eos, SP.pad, LOGLINEAR, True,
                 process="uniform")


def test_models_and_settings_the_uniform_sampler_cannot_read_are_refused(tiny):
    with pytest.raises(SamplingError, match="must read the time.*time_conditioning=true"):
        sample(tiny, infill(), SamplerConfig(), SP, process="uniform", time_conditioned=False)
    with pytest.raises(SamplingError, match="schedule Cosine.*use the loglinear schedule"):
        sample(tiny, infill(), SamplerConfig(), SP, schedule="cosine", process="uniform")
    with pytest.raises(SamplingError, match="process='absorbing' is not a diffusion process"):
        sample(tiny, infill(), SamplerConfig(), SP, process="absorbing")
    with pytest.raises(SamplingError, match="noise_removal='greedy' is the last step of a uniform-state"):
        sample(tiny, infill(), SamplerConfig(noise_removal="greedy"), SP)  # a masked-diffusion model
    with pytest.raises(SamplingError, match="noise_removal='argmax'; allowed"):
        SamplerConfig(noise_removal="argmax")
    causal = build_model(ModelConfig(size="tiny", time_conditioning=True), causal=True)
    with pytest.raises(SamplingError, match="this model is causal"):
        sample(causal, infill(), SamplerConfig(), SP, process="uniform")


def test_slicing_the_posterior_over_positions_changes_no_sample(tiny, monkeypatch):
    """Large vocabularies draw the posterior a slice of positions at a time (CHUNK); on the CPU generator the slices
    consume the same noise as one draw, so the samples are those of the unsliced sampler."""
    options = SamplerConfig(steps=4, seed=1, noise_removal="ancestral", top_p=0.9)
    whole = sample(tiny, infill(), options, SP, process="uniform").tokens
    monkeypatch.setattr(uniform_sampling, "CHUNK", 3 * tiny.cfg.vocab_size)  # 3 positions a slice
    assert torch.equal(sample(tiny, infill(), options, SP, process="uniform").tokens, whole)


def test_speed_is_measured_on_the_uniform_sampler(tiny):
    from unmask.eval.speed import measure_speed

    speed, result = measure_speed(tiny, infill(), SamplerConfig(steps=4), SP, process="uniform")
    assert speed.nfe == result.nfe == 5 and result.num_generated == int((infill() == SP.mask).sum())
