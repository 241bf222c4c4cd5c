"""The objective sections of the configuration: what a run trains (`[diffusion]`: masked, block, uniform-state
diffusion or the AR baseline) and what distillation does (`[distill]`). unmask.config assembles them into `Config`;
import them from there."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from unmask.config_base import Section


class DiffusionConfig(Section):
    """The training objective: masked diffusion (MDLM/MD4), block diffusion (BD3-LM), uniform-state diffusion
    (UDLM/Duo) or the autoregressive baseline."""

    objective: Literal["mdlm", "bd3lm", "duo", "ar"] = Field(
        "mdlm", description="mdlm: masked diffusion; bd3lm: block diffusion (causal across blocks of block_size "
        "tokens, masked diffusion inside each); duo: uniform-state diffusion (tokens resampled uniformly from the "
        "vocabulary, UDLM's ELBO, Duo's curriculum); ar: causal LM")
    block_size: int = Field(16, ge=1, description="bd3lm: tokens per block (1: autoregressive; seq_len: one block)")
    clip: tuple[float, float] | None = Field(
        None, strict=False,  # a saved config (TOML) holds the pair as an array
        description="BD3-LM's clipped schedule [lo, hi]: training times (mask rates under loglinear; the "
        "exact-count share) drawn from [lo, hi] instead of (eps, 1]; a biased, lower-variance training loss. "
        "Validation stays the unclipped bound")

    @model_validator(mode="after")
    def _check_clip(self) -> DiffusionConfig:
        if self.clip is not None and not 0 <= self.clip[0] < self.clip[1] <= 1:
            raise ValueError(f"diffusion.clip={list(self.clip)}: need 0 <= lo < hi <= 1, e.g. [0.3, 0.8]")
        return self
    schedule: str = Field("loglinear", description="noise schedule alpha(t): loglinear or cosine")
    eps: float = Field(1e-3, gt=0, lt=1, description="smallest time sampled, t in (eps, 1]")
    antithetic: bool = Field(True, description="low-discrepancy time sampling over the batch")
    estimator: Literal["continuous", "exact_count"] = Field(
        "continuous", description="continuous: mask each token w.p. 1-alpha(t), weight w(t); exact_count: mask "
        "exactly k~U{1..n} of a row's n tokens, weight n/k (LLaDA; lower variance). Validation always uses exact_count"
    )
    random_length_prob: float = Field(
        0.0, ge=0, le=1, description="fraction of batches cropped to a random length (LLaDA uses 0.01)"
    )
    prompt_conditioned: bool = Field(
        False, description="instruction tuning (SFT) on a split of `prepare-data --format chat`: prompt tokens are "
        "never masked and carry no loss, and each sample's loss is divided by its answer length, then averaged "
        "over samples (LLaDA's SFT loss); required by SFT splits and refused on pretraining ones")
    anneal_steps: int = Field(
        0, ge=0, description="AR -> diffusion adaptation (DiffuLLaMA): training attention is the causal mask OR-ed "
        "with Bernoulli(r) noise, r = step / anneal_steps, one mask per step shared by the batch; full attention "
        "from step anneal_steps on. 0: full attention from the start (RND1). Validation always attends fully")
    sft_eos_padding: Literal["all", "first", "none"] = Field(
        "all", description="SFT: which <eos> of a response (the one ending the answer, then the padding to seq_len) "
        "carry loss and count in the answer length. all: every one (LLaDA; the model learns where answers end and "
        "that nothing follows); first: only the one ending the answer; none: no <eos> (answers never learn to "
        "end). Every response <eos> is masked in all three, so the network never sees the answer's length")

    token_reweighting: Literal["none", "cart"] = Field(
        "none", description="training-time loss reweighting, not an ELBO: validation and `unmask eval` stay the plain "
        "NELBO. cart: Dream's context-adaptive token-level reweighting: each masked token's weight replaces the ELBO's "
        "w(t) (or n/k) by sum over the visible non-pad tokens j of p/2 (1-p)^(|i-j|-1) (p = cart_p), so tokens near "
        "context weigh more (at most 1); the loss is still divided per maskable token (SFT: per answer length). "
        "mdlm only")
    cart_p: float = Field(0.3, gt=0, le=1, description="token_reweighting = \"cart\": the geometric distribution's p "
                          "(Dream's geo_p; larger: weight concentrates on tokens next to context)")

    curriculum_start: int = Field(
        0, ge=0, description="duo: steps the curriculum holds tau at curriculum_tau_log10[0] before annealing it")
    curriculum_end: int = Field(
        0, ge=0, description="duo: the first curriculum_end steps train through Duo's Gaussian relaxation (soft "
        "inputs softmax(latent / tau), log10 tau linear from curriculum_start to curriculum_end); 0: no curriculum, "
        "the plain UDLM ELBO from step 0. Validation is always the true ELBO")
    # strict=False: a saved config (TOML) holds these pairs as arrays.
    curriculum_tau_log10: tuple[float, float] = Field(
        (-1.0, -2.0), strict=False,
        description="duo curriculum: log10 of the softmax temperature tau at its start and end")
    curriculum_gamma: tuple[float, float] = Field(
        (-3.5, -1.75), strict=False,
        description="duo curriculum: (gamma_min, gamma_max) of the Gaussian latent, gamma linear in t")

    @model_validator(mode="after")
    def _check_uniform_state(self) -> DiffusionConfig:
        curriculum = {"curriculum_start": 0, "curriculum_end": 0, "curriculum_tau_log10": (-1.0, -2.0),
                      "curriculum_gamma": (-3.5, -1.75)}
        changed = [k for k, default in curriculum.items() if getattr(self, k) != default]
        if self.objective != "duo":
            if changed:
                raise ValueError(f"diffusion.{changed[0]} configures Duo's curriculum; diffusion.objective="
                                 f"{self.objective!r} has none: remove it or set diffusion.objective=\"duo\"")
            return self
        refused = {"estimator": self.estimator != "continuous", "clip": self.clip is not None,
                   "schedule": self.schedule != "loglinear", "random_length_prob": self.random_length_prob > 0}
        for key, bad in refused.items():
            if bad:
                raise ValueError(f"diffusion.{key}={getattr(self, key)!r} is a masked-diffusion option that "
                                 "objective=\"duo\" does not implement (uniform-state noise, Duo's log-linear alpha, "
                                 f"continuous t): leave diffusion.{key} at its default")
        if self.curriculum_start and self.curriculum_start >= self.curriculum_end:
            raise ValueError(f"diffusion.curriculum_start={self.curriculum_start} must be below curriculum_end="
                             f"{self.curriculum_end} (tau anneals between them); lower curriculum_start")
        if not self.curriculum_gamma[0] < self.curriculum_gamma[1]:
            raise ValueError(f"diffusion.curriculum_gamma={list(self.curriculum_gamma)}: need gamma_min < gamma_max, "
                             "e.g. [-3.5, -1.75]")
        return self

    @model_validator(mode="after")
    def _check_sft(self) -> DiffusionConfig:
        if self.prompt_conditioned and self.objective != "mdlm":
            raise ValueError(f"diffusion.prompt_conditioned (SFT) is implemented for objective = \"mdlm\" (LLaDA's "
                             f"SFT), not {self.objective!r}; set diffusion.objective = \"mdlm\"")
        if self.token_reweighting != "none" and self.objective != "mdlm":
            raise ValueError(f"diffusion.token_reweighting={self.token_reweighting!r} (Dream's CART) reweights masked "
                             f"diffusion's tokens; diffusion.objective={self.objective!r} has its own weights: set "
                             "diffusion.token_reweighting=\"none\" or diffusion.objective=\"mdlm\"")
        return self


class DistillConfig(Section):
    """`unmask distill`: SDTT rounds or a consistency distillation from a frozen teacher checkpoint, and the
    steps-vs-quality table."""

    teacher: str | None = Field(None, description="teacher checkpoint (run dir or checkpoints/step-*); or --teacher")
    objective: Literal["sdtt", "masked_consistency", "dcd"] = Field(
        "sdtt", description="sdtt: one student step matches two teacher steps (masked teacher); masked_consistency: "
        "the student at x_t matches its own stop-gradient prediction one teacher ancestral step later (masked "
        "teacher; not Duo's DCD); dcd: Duo's discrete consistency distillation (uniform-state duo teacher): the "
        "student at x_t matches the teacher at x_s, s = t - 1/(teacher steps), on one deterministic Gaussian "
        "trajectory")
    divergence: Literal["kl", "reverse_kl", "tvd"] | None = Field(
        None, description="student-to-target divergence per token. kl: KL(target || student) (SDTT's default, "
        "Duo's kl-fwd); reverse_kl: KL(student || target) (Duo's kl-bwd); tvd. None: the objective's own "
        "default (kl for sdtt and masked_consistency, reverse_kl for dcd)")
    dcd_gamma: list[float] = Field(
        default_factory=lambda: [-4.0, -1.0], description="dcd: [gamma_min, gamma_max] of the Gaussian latent's "
        "log-SNR schedule, gamma linear in t (Duo's configs/algo/distillation.yaml); a list, as saved TOML reads back")
    start_steps: int = Field(1024, gt=1, description="sampling steps the first round's teacher takes")
    final_steps: int = Field(16, gt=0, description="sampling steps after the last round (halved each round)")
    steps_per_round: int = Field(1000, gt=0, description="optimizer steps per round; train.steps = rounds x this")
    teacher_dtype: Literal["fp32", "bf16"] = Field("fp32", description="the frozen teacher's inference dtype")
    teacher_weights: Literal["auto", "ema", "raw"] = Field(
        "auto", description="the teacher checkpoint's weights: auto (its EMA when it has one, else raw), ema "
        "(refuse a checkpoint without EMA), raw")
    eval: bool = Field(True, description="write the steps-vs-quality table (JSON + PNG) at the end")
    eval_teacher_steps: list[int] = Field([1024, 256, 64, 16, 8], description="teacher sampling steps evaluated")
    eval_student_steps: list[int] = Field([64, 16, 8], description="student sampling steps evaluated")
    eval_samples: int = Field(16, gt=0, description="unconditional samples per table row")
    eval_seeds: list[int] = Field(
        [0, 1, 2], min_length=1, description="one sample set per seed: every row is reported as mean +- sd over "
        "the sets, and a comparison is stated only when every set agrees")
    eval_length: int | None = Field(None, gt=0, description="tokens per sample (default train.seq_len)")
    eval_block_length: int | None = Field(
        None, gt=0, description="sample the table's rows in semi-autoregressive blocks of this many positions (the "
        "steps split evenly over them); None: one block, as pretraining's samples")
    reference: str | None = Field(
        None, description="AR judge for gen. perplexity: unmask AR run, HF folder, .gguf file or smollm2"
    )

    @model_validator(mode="after")
    def _check_rounds(self) -> DistillConfig:
        if len(self.dcd_gamma) != 2 or not self.dcd_gamma[0] < self.dcd_gamma[1]:
            raise ValueError(f"distill.dcd_gamma={list(self.dcd_gamma)}: need gamma_min < gamma_max, e.g. [-4, -1]")
        ratio = self.start_steps // self.final_steps
        if self.start_steps % self.final_steps or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(f"start_steps={self.start_steps} must be final_steps={self.final_steps} times a power "
                             "of two (at least one halving round)")
        return self

    @property
    def rounds(self) -> int:
        return (self.start_steps // self.final_steps).bit_length() - 1

    @property
    def divergence_kind(self) -> str:
        """`divergence`, or the objective's default when unset."""
        return self.divergence or ("reverse_kl" if self.objective == "dcd" else "kl")
