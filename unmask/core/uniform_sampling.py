"""Sampling from a uniform-state diffusion model (UDLM, Duo), through `sampling.generate(..., process="uniform")`.

A uniform-state network is the ordinary transformer, so nothing in the model says which process it was trained on:
the caller says it (unmask reads diffusion.objective = "duo"; an export reads config.json "diffusion_process").

- Prior: every `<mask>` of the template starts as a token drawn uniformly from the whole vocabulary of V tokens
  (s-sahoo/duo `UniformState.prior_sample`); fixed positions never change.
- `steps` ancestral steps down Duo's time grid linspace(1, T_END, steps + 1) (`Diffusion.generate_samples`): from t to
  s the network reads the tokens and t, x_theta = softmax of its logits, and every generated position draws
  x_s ~ q(x_s | x_t, x_0 ~ x_theta) (uniform_state.posterior) by Gumbel-max in float64. Temperature, top-k and top-p
  shape x_theta (the model's prediction of the data) before the posterior, as Duo's p_nucleus does; the filtered
  x_theta is renormalised (Duo's is not, see `x_theta`), so a network whose prediction ignores its input samples the
  filtered distribution exactly at any number of steps. Temperature 0 makes x_theta its argmax; the posterior's noise
  is still drawn.
- Noise removal at the grid's last time (`SamplerOptions.noise_removal`): "greedy", the argmax of x_theta (Duo's
  greedy-tail sampler, paper Sec. 4.2, used for its distilled few-step samples), or "ancestral", one more posterior
  step to alpha = 1 (Duo's config default). Either is one more network call: NFE = steps + 1.
Every position may change at every step and the network reads t, so no call is ever cached. stop_at_eos cuts each row
after its first generated `<eos>` once sampling is done (rows cannot stop early: every position moves to the end).

Imports only torch and its siblings (see unmask.core).
"""

from __future__ import annotations

import torch

from .sampling_steps import cut_at_eos, filter_logits, gumbel_argmax
from .schedule import LogLinear
from .uniform_state import alpha, posterior

T_END = 1e-5  # the grid's last time: s-sahoo/duo `restore_model_and_sample(eps=1e-5)`, not the schedule's eps 1e-3
NOISE_REMOVAL = ("greedy", "ancestral")
CHUNK = 1 << 24  # float64 elements of one [positions, V] slice: the posterior's temporaries stay ~1 GB at any size


def time_grid(steps: int) -> torch.Tensor:
    """Duo's sampling times [steps + 1], float64, from 1 down to T_END."""
    return torch.linspace(1, T_END, steps + 1, dtype=torch.float64)


def vocab_size_of(model) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    size = getattr(cfg, "vocab_size", None) or getattr(model, "vocab_size", None)
    if not size:
        raise ValueError(f"{type(model).__name__} has no cfg.vocab_size (or vocab_size): the uniform-state sampler "
                         "draws its starting tokens from the whole vocabulary and needs its size")
    return int(size)


def check_uniform(model, options, time_conditioned: bool, schedule=None) -> None:
    """What a uniform-state model cannot be sampled with, as one ValueError naming the option and the fix."""
    o = options
    checks = [
        (o.kind == "ancestral", f"kind={o.kind!r} decodes a masked-diffusion model (tokens committed once); a "
         "uniform-state (Duo) model's tokens all move at every step: use kind='ancestral' (its posterior sampler)"),
        (o.block_length is None, f"block_length={o.block_length}: the uniform-state sampler denoises the whole "
         "sequence at once (Duo's semi-AR strides are not supported): leave block_length out"),
        (o.kv_cache == "none", f"kv_cache={o.kv_cache!r}: every position of a uniform-state sample changes at every "
         "step, so no keys or values can be kept: use kv_cache='none'"),
        (not o.guidance, f"guidance={o.guidance}: classifier-free guidance masks the prompt, and a uniform-state "
         "model has no <mask> state: set guidance=0"),
        (o.noise_removal is None or o.noise_removal in NOISE_REMOVAL,
         f"noise_removal={o.noise_removal!r}; allowed: {list(NOISE_REMOVAL)}"),
        (time_conditioned, "a uniform-state model must read the time: its noisy tokens do not show how noisy they "
         "are (there is no <mask> to count); train it with model.time_conditioning=true"),
        (not getattr(model, "causal", False), "this model is causal (an autoregressive baseline), not a uniform-state "
         "diffusion model: sample it with kind='ar' and the masked process"),
        (not int(getattr(model, "block_size", 0) or 0), "this is a block-diffusion (bd3lm) model, trained on the "
         "masked process: sample it with process='masked'"),
        (schedule is None or isinstance(schedule, LogLinear), f"schedule {type(schedule).__name__}: the uniform-state "
         "sampler runs Duo's log-linear alpha(t) = 1 - (1 - eps) t (uniform_state.py): use the loglinear schedule"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"sampler (uniform-state): {message}")


def x_theta(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The model's prediction of x_0 [N, V] (float64, rows sum to 1) from its logits: tempered, then top-k / top-p
    filtered and renormalised. Duo exponentiates the filtered log-probabilities without renormalising, which weighs
    x_theta's terms of the posterior below its uniform ones whenever the filter drops mass; renormalised, the filter
    reads as sampling data from the filtered prediction."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    return filter_logits(logits / temperature, top_k, top_p).softmax(-1)


class UniformNetwork:
    """The network as the uniform sampler sees it: logits [N, V] (the model's dtype) at the generated positions, each
    call counted."""

    def __init__(self, model, generated: torch.Tensor):
        self.model, self.generated, self.nfe = model, generated, 0

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        # The network reads the log-linear time of the step's alpha (time_of(alpha(t)) = t on this schedule).
        times = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        self.nfe += 1
        return self.model(x, times)[self.generated]


@torch.no_grad()
def generate_uniform(model, template: torch.Tensor, options, mask_id: int, eos_id: int,
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Fill every `<mask>` of `template` [B, L] by uniform-state ancestral sampling. Returns what sampling.generate
    does: (tokens [B, L], lengths [B], network evaluations, steps)."""
    o = options
    generated = template == mask_id  # [B, L]
    generator = torch.Generator(device=template.device).manual_seed(o.seed)
    V = vocab_size_of(model)
    prior = torch.randint(0, V, template.shape, generator=generator, device=template.device)  # [B, L]
    x = torch.where(generated, prior, template)
    network = UniformNetwork(model, generated)
    times = time_grid(o.steps)
    for k in range(o.steps):
        x = posterior_step(network, x, generated, float(times[k]), float(times[k + 1]), o, generator)
    if (o.noise_removal or "greedy") == "greedy":
        final = network(x, float(times[-1])).argmax(-1)  # [N]
        x = x.clone()
        x[generated] = final
    else:
        x = posterior_step(network, x, generated, float(times[-1]), None, o, generator)
    lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
    if o.stop_at_eos:
        x, lengths = cut_at_eos(x, generated, eos_id, pad_id)
    return x, lengths, network.nfe, o.steps


def posterior_step(network: UniformNetwork, x: torch.Tensor, generated: torch.Tensor, t: float, s: float | None,
                   o, generator: torch.Generator) -> torch.Tensor:
    """x_t -> x_s at the generated positions; s None: to alpha = 1 (Duo's ancestral noise removal)."""
    logits, xt = network(x, t), x[generated]  # [N, V], [N]
    alpha_t = alpha(torch.tensor(t, dtype=torch.float64, device=x.device))
    alpha_s = torch.ones((), dtype=torch.float64, device=x.device) if s is None else alpha(
        torch.tensor(s, dtype=torch.float64, device=x.device))
    rows = max(1, CHUNK // logits.shape[-1])  # a fixed slicing: the same noise draws on every run of a seed
    tokens = [draw_posterior(logits[i:i + rows], xt[i:i + rows], alpha_s, alpha_t, o, generator)
              for i in range(0, logits.shape[0], rows)]
    x = x.clone()
    x[generated] = torch.cat(tokens)
    return x


def draw_posterior(logits: torch.Tensor, xt: torch.Tensor, alpha_s: torch.Tensor, alpha_t: torch.Tensor, o,
                   generator: torch.Generator) -> torch.Tensor:
    """Tokens x_s [n] for n positions with logits [n, V] at x_t [n]."""
    # 1. The model's prediction of x_0 (tempered, filtered, float64): [n, V].
    p0 = x_theta(logits.double(), o.temperature, o.top_k, o.top_p)
    # 2. The posterior q(x_s | x_t, x_0 ~ p0) [n, V] and a draw from it by float64 Gumbel-max: [n].
    return gumbel_argmax(posterior(p0, xt, alpha_s, alpha_t).log(), generator)

