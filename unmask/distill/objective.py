"""Distillation objectives: a student learns to sample in fewer steps from a frozen teacher.

Each has the diffusion objective's interface (`loss(model, x0, key)`, `eval_terms`, `nll`), so every engine trains
them unchanged; `model` is the student, the teacher lives here. Targets are made on the fly from real tokens, and
every random number comes from generators seeded by the step's BatchKey, so a resumed run reproduces them.

Masked teachers (diffusion.objective = "mdlm"): x_t comes from the forward masking process
(MaskedDiffusion.corrupt), then the teacher takes ancestral steps from t.
- `SDTT` (Deschenaux & Gulcehre 2024): the student's one step t -> t - 2D matches the teacher's two steps
  t -> t - D -> t - 2D, D = 1 / (the teacher's sampling steps this round): the student needs half as many.
- `MaskedConsistency`: a masked-diffusion consistency variant (not Duo's DCD): the student's prediction at x_t
  matches its own stop-gradient prediction at x_s, one stochastic teacher ancestral step later.

Uniform-state teachers (diffusion.objective = "duo"):
- `DuoDCD` (Duo's discrete consistency distillation, Sahoo et al. 2025, s-sahoo/duo `algo.Distillation`): x_t and
  x_s are argmaxes of one Gaussian latent at two noise levels, a deterministic trajectory; the student at (x_t, t)
  matches the teacher at (x_s, s), s = t - dt, dt = 1 / (the teacher's sampling steps this round).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from unmask.config import DistillConfig
from unmask.core.uniform_state import gaussian_scales, gaussian_to_uniform, time_of
from unmask.diffusion.noise import BatchKey, mix, per_sample_normals, per_sample_uniforms
from unmask.diffusion.objective import LossOutput, MaskedDiffusion
from unmask.engines.base import autocast

REVEAL_STREAM, TOKEN_STREAM = 0xD1, 0xD2  # seed offsets of the teacher's draws, apart from the masking draws
LATENT_STREAM = 0xD3  # seed offset of DCD's Gaussian latents
LOG_FLOOR = -1e4  # stands in for log 0 (the <mask> column) so that 0 * log 0 terms stay 0, not nan


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row divergence between target p and student q given as log-probs [N, V] -> [N]."""
    log_p, log_q = log_p.clamp_min(LOG_FLOOR), log_q.clamp_min(LOG_FLOOR)
    if kind == "kl":  # KL(p || q): mode-covering, SDTT's default, Duo's kl-fwd
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":  # KL(q || p): mode-seeking, Duo's kl-bwd (DCD's default)
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"distill.divergence={kind!r}; allowed: kl, reverse_kl, tvd")


def frozen_copy(model: nn.Module, dtype: str) -> nn.Module:
    """The teacher: its own inference copy, no gradients, optionally bf16."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher.to(torch.bfloat16) if dtype == "bf16" else teacher


class _Distill:
    """What every variant shares: the frozen teacher, rounds and the teacher's steps; validation goes through the
    diffusion objective the run was built with."""

    def __init__(self, cfg: DistillConfig, diffusion, teacher: nn.Module):
        self.cfg, self.diffusion, self.teacher = cfg, diffusion, teacher
        self.seed = diffusion.seed
        self.steps = cfg.start_steps  # the teacher's sampling steps this round

    @property
    def nll(self):  # the loss the diffusion objective was built with (validation goes through it)
        return self.diffusion.nll

    def set_round(self, round_: int) -> None:
        self.steps = self.cfg.start_steps >> round_

    @torch.no_grad()
    def replace_teacher(self, student_state: dict) -> None:
        """Round boundary: the previous student becomes the teacher (copied: the student keeps training)."""
        self.teacher.load_state_dict(student_state)

    def eval_terms(self, model, x0, time_samples, key):
        return self.diffusion.eval_terms(model, x0, time_samples, key)


class _MaskedDistill(_Distill):
    """Masked teachers: the forward masking process and the teacher's ancestral steps."""

    def __init__(self, cfg: DistillConfig, diffusion: MaskedDiffusion, teacher: nn.Module):
        super().__init__(cfg, diffusion, teacher)
        self.mask_id, self.schedule = diffusion.mask_id, diffusion.schedule

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, where: torch.Tensor, dtype: str | None = None):
        """log p(x0 | x) at the positions `where` [B, L]: [N, V] fp32, <mask> never predicted (SUBS). Computed
        out of place (unlike subs_log_probs) so the student's gradient can flow through it. `dtype` None (the
        student) computes in the engine's autocast region; the teacher's dtype overrides it."""
        args = (x, t) if self.diffusion.time_conditioned else (x,)
        with autocast(dtype, x.device):
            logits = model(*args)[where].float()  # [N, V]
        suppress = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        suppress[self.mask_id] = True
        return logits.masked_fill(suppress, float("-inf")).log_softmax(-1)

    def teacher_step(self, xt: torch.Tensor, t: torch.Tensor, s: torch.Tensor, key: BatchKey, stream: int):
        """One ancestral step of the teacher t -> s per sample (t, s: [B]), from every mask of x_t.

        Returns (x_s [B, L], revealed [B, L] bool, teacher log-probs at x_t's masks [N, V])."""
        B, L = xt.shape
        masked = xt == self.mask_id  # [B, L]
        log_p = self.predict(self.teacher, xt, t, masked, self.cfg.teacher_dtype)  # [N, V]
        # 1. Each mask is revealed with probability (alpha(s) - alpha(t)) / (1 - alpha(t)): [B, L].
        a_t, a_s = self.schedule.alpha(t.double()), self.schedule.alpha(s.double())
        p_reveal = ((a_s - a_t) / (1 - a_t)).float()[:, None]  # [B, 1]
        u = per_sample_uniforms(mix(self.seed, REVEAL_STREAM, stream), key, B, L).to(xt.device)
        revealed = masked & (u < p_reveal)  # [B, L]
        # 2. Tokens by inverse-CDF sampling from the teacher, one seeded uniform per position: [N].
        #    float64 uniforms, like the samplers' draws: float32 ones cannot land in a rare token's CDF interval.
        v = per_sample_uniforms(mix(self.seed, TOKEN_STREAM, stream), key, B, L, torch.float64).to(xt.device)[masked]
        cdf = log_p.double().exp().cumsum(-1)  # [N, V]
        tokens = torch.searchsorted(cdf, (v * cdf[:, -1])[:, None])[:, 0].clamp_max(cdf.shape[-1] - 1)
        xs = torch.where(revealed, xt.masked_scatter(masked, tokens), xt)
        return xs, revealed, log_p

    def loss(self, model, x0: torch.Tensor, key: BatchKey, prompt_mask: torch.Tensor | None = None) -> LossOutput:
        # 1. Forward process on real tokens: x_t [B, L], t [B], masked [B, L] (pads and prompts never are).
        c = self.diffusion.corrupt(x0, key, prompt_mask)
        xt = c.inputs[0]
        _, masked, _, counts = c.targets
        t = c.inputs[1] if len(c.inputs) > 1 else self.diffusion.times(key, x0.shape[0]).to(x0.device)  # [B]
        # 2. Target distribution at each masked position (no gradient): [N, V].
        with torch.no_grad():
            log_target = self.target(model, xt, t, key)
        # 3. Student's one-step distribution at x_t: [N, V].
        log_student = self.predict(model, xt, t, masked)
        # 4. Divergence per masked token [N], normalised per maskable token like the ELBO.
        per_token = divergence(log_target, log_student, self.cfg.divergence_kind)
        num_tokens = int(counts.sum())
        loss = per_token.sum() / max(num_tokens, 1)
        return LossOutput(loss, num_tokens, {"mask_rate": float(masked.sum()) / max(num_tokens, 1),
                                             "teacher_steps": float(self.steps)})

    def target(self, model, xt, t, key) -> torch.Tensor:
        """log target [N, V] at the N masks of x_t."""
        raise NotImplementedError


class SDTT(_MaskedDistill):
    """Self-distillation through time: one student step reproduces two teacher steps."""

    def target(self, model, xt: torch.Tensor, t: torch.Tensor, key: BatchKey) -> torch.Tensor:
        dt = 1.0 / self.steps  # the teacher's step; the student's is 2 dt (half as many steps)
        u = (t - dt).clamp_min(0)  # [B]; the second teacher step ends at t - 2 dt
        masked = xt == self.mask_id  # [B, L]
        # 1. First teacher step t -> u; its distribution p(x0 | x_t) at x_t's masks [N, V].
        xu, first, log_p1 = self.teacher_step(xt, t, u, key, stream=1)
        # 2. Second teacher step u -> t - 2 dt: only its p(x0 | x_u) is needed, at the same positions [N, V].
        log_p2 = self.predict(self.teacher, xu, u, masked, self.cfg.teacher_dtype)
        # 3. The distribution each token was (or will be) drawn from over the two steps: a token revealed in the
        #    first step came from p1; every other mask is decided with x_u's context, by p2: [N, V].
        return torch.where(first[masked][:, None], log_p1, log_p2)


class MaskedConsistency(_MaskedDistill):
    """A masked-diffusion consistency variant (unmask's own; not Duo's DCD, which needs a uniform-state teacher):
    the student's prediction at x_t matches its own stop-gradient prediction at x_s, where x_s is one stochastic
    teacher ancestral step t -> s later; tokens that step revealed keep the teacher's distribution."""

    def target(self, model, xt: torch.Tensor, t: torch.Tensor, key: BatchKey) -> torch.Tensor:
        s = (t - 1.0 / self.steps).clamp_min(0)  # [B]
        masked = xt == self.mask_id  # [B, L]
        # 1. The trajectory: one teacher ancestral step t -> s: x_s [B, L].
        xs, revealed, log_p1 = self.teacher_step(xt, t, s, key, stream=1)
        # 2. The student's own prediction further along it, stop-gradient (the consistency target): [N, V].
        log_ps = self.predict(model, xs, s, masked)
        # 3. A token the trajectory already committed keeps the distribution it was drawn from: [N, V].
        return torch.where(revealed[masked][:, None], log_p1, log_ps)


class DuoDCD(_Distill):
    """Duo's discrete consistency distillation (s-sahoo/duo `algo.Distillation.nll`) for uniform-state teachers.

    Per sample: t from the diffusion objective's stratified times, t <- min(t + dt, 1), s = t - dt, dt = 1 / (the
    teacher's steps this round) = 2^round / start_steps (Duo's `_compute_dt`; the stage's round boundary is Duo's
    hard teacher refresh every update_teacher_every = steps_per_round steps); gamma linear in t on dcd_gamma. One
    Gaussian latent eps [L, V] per sample gives x_t = argmax(a_g(t) onehot(x0) + s_g(t) eps) and x_s likewise at s:
    one deterministic trajectory. The student reads (x_t, t), the teacher (x_s, s), each at the log-linear time of
    its uniform-state alpha. Loss per non-pad token: the divergence (default KL(student || teacher), Duo's kl-bwd)
    over the full vocabulary: in a uniform-state model every token may be noise, and no token is suppressed.

    Needs of the diffusion objective (UniformDiffusion): seed, pad_id, vocab_size, time_conditioned, times(key,
    B), eval_terms, nll."""

    def __init__(self, cfg: DistillConfig, diffusion, teacher: nn.Module):
        super().__init__(cfg, diffusion, teacher)
        self.pad_id = diffusion.pad_id

    @property
    def dt(self) -> float:
        return 1.0 / self.steps

    def times(self, key: BatchKey, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, s) [B] float64: Duo's t = clip(t + dt, 0, 1), s = t - dt."""
        t = (self.diffusion.times(key, batch).double() + self.dt).clamp(0, 1)
        return t, t - self.dt

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        lo, hi = self.cfg.dcd_gamma
        return lo + t * (hi - lo)

    def trajectory(self, x0: torch.Tensor, gamma_t: torch.Tensor, gamma_s: torch.Tensor, key: BatchKey, vocab: int):
        """(x_t, x_s) [B, L] from ONE latent eps [B, L, V]: argmax(a_g onehot(x0) + s_g eps) at gamma_t and gamma_s
        [B]; pads stay pads. Dividing by s_g > 0 leaves the argmax alone, so with mu = a_g / s_g = exp(-gamma / 2)
        x = x0 where eps[x0] + mu beats the best other entry, else that entry: one reduction serves both times."""
        B, L = x0.shape
        eps = per_sample_normals(mix(self.seed, LATENT_STREAM), key, B, (L, vocab), x0.device)  # [B, L, V]
        clean = eps.gather(-1, x0[..., None])[..., 0]  # [B, L]
        best, other = eps.scatter_(-1, x0[..., None], float("-inf")).max(-1)  # [B, L] the best wrong token
        pad = x0 == self.pad_id

        def at(gamma: torch.Tensor) -> torch.Tensor:
            a_g, s_g = gaussian_scales(gamma.double())
            mu = (a_g / s_g).float()[:, None]  # [B, 1]
            return torch.where(pad | (clean + mu > best), x0, other)

        return at(gamma_t), at(gamma_s)

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, where: torch.Tensor, dtype: str | None = None):
        """log x_theta(x) [N, V] fp32 at the positions `where`, full vocabulary (uniform-state: nothing suppressed).
        `dtype` None (the student) computes in the engine's autocast region; the teacher's dtype overrides it."""
        args = (x, t.float()) if self.diffusion.time_conditioned else (x,)
        with autocast(dtype, x.device):
            logits = model(*args)[where].float()  # [N, V]
        return logits.log_softmax(-1)

    def loss(self, model, x0: torch.Tensor, key: BatchKey, prompt_mask: torch.Tensor | None = None) -> LossOutput:
        B, _ = x0.shape
        vocab = self.diffusion.vocab_size  # the vocabulary the teacher's forward process covers
        # 1. Times and noise levels: t, s [B]; gamma linear in time; the uniform-state alpha of each gamma [B].
        t, s = self.times(key, B)
        gamma_t, gamma_s = self.gamma(t).to(x0.device), self.gamma(s).to(x0.device)
        alpha_t, alpha_s = gaussian_to_uniform(gamma_t, vocab)[0], gaussian_to_uniform(gamma_s, vocab)[0]
        # 2. One deterministic trajectory through the Gaussian latent: x_t, x_s [B, L].
        xt, xs = self.trajectory(x0, gamma_t, gamma_s, key, vocab)
        scored = x0 != self.pad_id  # [B, L]
        # 3. Teacher at (x_s, s), no gradient, in its own dtype: the target [N, V].
        with torch.no_grad():
            log_teacher = self.predict(self.teacher, xs, time_of(alpha_s), scored, self.cfg.teacher_dtype)
        # 4. Student at (x_t, t): [N, V].
        log_student = self.predict(model, xt, time_of(alpha_t), scored)
        # 5. Divergence per non-pad token [N], normalised per non-pad token of the batch.
        per_token = divergence(log_teacher, log_student, self.cfg.divergence_kind)
        num_tokens = int(scored.sum())
        loss = per_token.sum() / max(num_tokens, 1)
        noised = float(((xt != x0) & scored).sum()) / max(num_tokens, 1)
        return LossOutput(loss, num_tokens, {"noise_rate": noised, "teacher_steps": float(self.steps)})


OBJECTIVES = {"sdtt": SDTT, "masked_consistency": MaskedConsistency, "dcd": DuoDCD}


def build_distill_objective(cfg: DistillConfig, diffusion, teacher: nn.Module) -> _Distill:
    return OBJECTIVES[cfg.objective](cfg, diffusion, teacher)
