"""Uniform-state diffusion (UDLM, Schiff et al. 2025; Duo, Sahoo et al. 2025; s-sahoo/duo `algo.py`).

Noise resamples each token uniformly from the whole vocabulary (the draw may be the clean token itself) with
probability 1 - alpha_t, alpha_t = 1 - (1 - eps) t; there is no `<mask>`, so a noised token does not say it is
noise and the network reads t. The loss is UDLM's continuous-time NELBO integrand (unmask.core.uniform_state) at
every non-pad position, divided by the micro-batch's non-pad tokens as MDLM's is.

Duo's curriculum ("simple" mode of `algo.DUO.nll`) trains the first `curriculum_end` steps through the Gaussian
process behind the uniform one: latent = a_g onehot(x_0) + s_g eps, gamma linear in t; the network reads the soft
input softmax(latent / tau) (tau annealed, log10-linear) at the time whose log-linear alpha is the Gaussian's, and
the loss is the same NELBO integrand at x_t = argmax(latent) with that alpha and d alpha / d t. It lowers the
variance of early training; validation and `unmask eval` always score the true ELBO (`eval_terms`).

Times are MaskedDiffusion's stratified, antithetic draws over the global batch; every other draw (replacement
decisions, replacement tokens, Gaussian latents) comes from per-sample streams seeded by BatchKey, so every layout
and a resume give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unmask.config import DiffusionConfig
from unmask.core import uniform_state
from unmask.diffusion.noise import BatchKey, mix, per_sample_normals, per_sample_uniforms
from unmask.diffusion.objective import TIME_STREAM, Corrupted, EvalTerms, LossOutput, MaskedDiffusion, top1_hits

TOKEN_STREAM = 0x7A  # seed offset of the replacement tokens, apart from the replacement decisions
LATENT_STREAM = 0x6C  # seed offset of the curriculum's Gaussian latents

# (logits [..., V or V/tp], x_t [...], x_0 [...], alpha_t [...]) -> (sum_log_xbar, xbar_xt, xbar_x0) [...] float64
VocabStats = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class UniformDiffusion(MaskedDiffusion):
    """UDLM's ELBO with Duo's curriculum. `vocab_size`: the model's (the uniform draws cover all of it);
    `vocab_stats`: the vocabulary reductions of the logits (vocab-parallel under tensor parallelism)."""

    def __init__(self, cfg: DiffusionConfig, pad_id: int, vocab_size: int, seed: int = 0,
                 vocab_stats: VocabStats = uniform_state.vocab_stats):
        super().__init__(cfg, mask_id=-1, pad_id=pad_id, seed=seed, time_conditioned=True)  # no <mask>
        self.vocab_size, self.vocab_stats = vocab_size, vocab_stats

    def curriculum(self, step: int) -> float | None:
        """The curriculum's tau at training step `step` (0-based), or None once it is over (or off): held at 10 **
        tau_log10[0] until curriculum_start, then log10 tau linear to tau_log10[1] at curriculum_end (Duo's
        `_compute_gumbel_tau_inverse`)."""
        start, end = self.cfg.curriculum_start, self.cfg.curriculum_end
        if step >= end:
            return None
        first, last = self.cfg.curriculum_tau_log10
        frac = max(step - start, 0) / (end - start)
        return 10.0 ** (first + frac * (last - first))

    def corrupt(self, x0: torch.Tensor, key: BatchKey, prompt_mask: torch.Tensor | None = None) -> Corrupted:
        """Training corruption of x0 [B, L] at stratified times: Duo's Gaussian curriculum while it runs, else
        uniform resampling. Network inputs (x_t [B, L] or soft x_t [B, L, V], t [B]); targets (x0, x_t, alpha_t [B],
        dalpha_t / dt [B]), float64."""
        t = self.time_of(self.fractions(key, x0.shape[0])).to(x0.device)  # [B, 1]
        tau = self.curriculum(key.step)
        c = self._resample(x0, t[:, 0], key) if tau is None else self._gaussian(x0, t[:, 0], key, tau)
        return self.annealed(c, key.step, x0.shape[1], x0.device)  # an adapted AR source (anneal_steps > 0)

    def _resample(self, x0: torch.Tensor, t: torch.Tensor, key: BatchKey) -> Corrupted:
        """Forward process q(x_t | x_0): each non-pad token replaced w.p. 1 - alpha_t by a uniform draw."""
        B, L = x0.shape
        alpha = uniform_state.alpha(t.double(), self.cfg.eps)  # [B]
        u = per_sample_uniforms(self.seed, key, B, L).to(x0.device)  # [B, L] replacement decisions
        r = per_sample_uniforms(mix(self.seed, TOKEN_STREAM), key, B, L, torch.float64).to(x0.device)
        drawn = (r * self.vocab_size).long().clamp_max(self.vocab_size - 1)  # [B, L] uniform over the vocabulary
        replaced = (u < 1 - alpha[:, None]) & (x0 != self.pad_id)
        xt = torch.where(replaced, drawn, x0)
        dalpha = uniform_state.alpha_prime(t.double(), self.cfg.eps)
        return Corrupted((xt, t.float()), (x0, xt, alpha, dalpha))

    def _gaussian(self, x0: torch.Tensor, t: torch.Tensor, key: BatchKey, tau: float) -> Corrupted:
        """Duo's curriculum: soft input softmax(latent / tau), latent = a_g onehot(x_0) + s_g eps [B, L, V]."""
        B, L = x0.shape
        V = self.vocab_size
        # 1. gamma linear in t; the uniform-state alpha that argmax(latent) follows, and its t-derivative: [B].
        g_min, g_max = self.cfg.curriculum_gamma
        gamma = g_min + t.double() * (g_max - g_min)
        alpha, dalpha_dgamma = uniform_state.gaussian_to_uniform(gamma, V)
        # 2. Gaussian latent [B, L, V] on x0's device, per-sample seeded; built in place (each [B, L, V] copy is
        # B L V floats: gigabytes at a real vocabulary).
        a_g, s_g = (s.float()[:, None, None] for s in uniform_state.gaussian_scales(gamma))
        latent = per_sample_normals(mix(self.seed, LATENT_STREAM), key, B, (L, V), x0.device).mul_(s_g)
        latent.scatter_add_(-1, x0[..., None], a_g.expand(B, L, 1))  # + a_g onehot(x_0)
        # 3. The discrete sample the loss scores, and the soft input the network reads; pads stay one-hot pad.
        pad = x0 == self.pad_id
        xt = torch.where(pad, x0, latent.argmax(-1))  # [B, L]
        soft = latent.div_(tau).softmax(-1).masked_fill_(pad[..., None], 0.0)  # [B, L, V]
        soft[..., self.pad_id] += pad.float()
        time = uniform_state.time_of(alpha, self.cfg.eps).float()  # the log-linear t of this alpha: [B]
        return Corrupted((soft, time), (x0, xt, alpha, dalpha_dgamma * (g_max - g_min)))

    def loss_from_logits(self, logits: torch.Tensor, targets: tuple) -> LossOutput:
        x0, xt, alpha, dalpha = targets
        per_token, scored = self._per_token(logits, targets)  # [N], [B, L]
        num_tokens = int(scored.sum())
        # 5. Sum over non-pad positions, normalised per non-pad token of the micro-batch (as MDLM).
        loss = (per_token.sum() / max(num_tokens, 1)).float()
        return LossOutput(loss, num_tokens, {"noise_rate": float((xt != x0)[scored].sum()) / max(num_tokens, 1)})

    def _per_token(self, logits: torch.Tensor, targets: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(NELBO integrand [N] at the non-pad positions, those positions [B, L] bool)."""
        x0, xt, alpha, dalpha = targets
        # 4. Every non-pad position is scored (any token may have been resampled): [N].
        scored = x0 != self.pad_id
        rows = scored.nonzero()[:, 0]
        a, da = alpha.double()[rows], dalpha.double()[rows]
        stats = self.vocab_stats(logits[scored], xt[scored], x0[scored], a)
        return uniform_state.nelbo_per_token(*stats, xt[scored], x0[scored], a, da, self.vocab_size), scored

    @torch.no_grad()
    def eval_terms(self, model, x0: torch.Tensor, time_samples: int, key: BatchKey | int,
                   prompt_mask: torch.Tensor | None = None, accuracy: bool = False) -> EvalTerms:
        """Deterministic NELBO estimate per sequence, the same for a sample in any batch split or layout: each
        sample (by its global index in `key`; an int n means BatchKey(step=n)) gets `time_samples` times, one per
        stratum of (eps, 1] with a random offset seeded by (key, index), and resampling draws seeded likewise. The
        true ELBO (never the curriculum). `accuracy`: top-1 of x_theta against x_0 at every non-pad position of
        every draw (EvalTerms.hits / predicted): uniform noise leaves no position known to be clean."""
        if prompt_mask is not None and self.cfg.prompt_conditioned:
            raise ValueError("objective='duo' scores whole sequences; prompt-conditioned (SFT) eval is mdlm's")
        B, L = x0.shape
        key = BatchKey(step=key, global_batch=B) if isinstance(key, int) else key
        offset = per_sample_uniforms(mix(self.seed, TIME_STREAM), key, B, 1).double()  # [B, 1]
        draws, hits, predicted = [], 0, 0
        for j in range(time_samples):
            t = self.time_of(((j + offset) / time_samples).to(x0.device))[:, 0]  # [B]
            sub = BatchKey(key.step * time_samples + j, key.micro, key.dp_rank, key.dp_world, key.global_batch)
            c = self._resample(x0, t, sub)
            logits = self.network(model, c.inputs)
            per_token, scored = self._per_token(logits, c.targets)
            per_seq = torch.zeros(B, dtype=torch.float64, device=x0.device)
            draws.append(per_seq.index_add_(0, scored.nonzero()[:, 0], per_token.double()))
            if accuracy:
                hits = hits + top1_hits(logits, x0, scored)
                predicted = predicted + scored.sum(1)
        draws = torch.stack(draws)  # [time_samples, B]
        mc_var = draws.var(0) / time_samples if time_samples > 1 else torch.full_like(draws[0], float("nan"))
        scored_counts = (hits, predicted) if accuracy else (None, None)
        return EvalTerms(draws.mean(0), (x0 != self.pad_id).sum(1), mc_var, *scored_counts)
