"""Typed, validated run configuration: one pydantic model per section, TOML presets plus overrides.

A config file is TOML with the sections below; `--section.key=value` arguments override it. Every
problem (unknown key, wrong type, impossible value) becomes one `ConfigError` line naming the key,
the value given and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import Field, ValidationError, model_validator

from unmask.config_base import Section
from unmask.config_objectives import DiffusionConfig, DistillConfig
from unmask.config_runtime import CheckpointConfig, LaunchConfig, ParallelConfig, TrackingConfig
from unmask.config_sizes import MODEL_SIZES
from unmask.errors import ConfigError

# The names unmask/core/schedule.py registers; a literal here keeps config a leaf that diffusion depends on
# (tests/unit/test_config.py checks the two agree).
SCHEDULE_NAMES = ("loglinear", "cosine")
# The projections of unmask's blocks (bert's have the same names, without w3) that LoRA may adapt.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class ModelConfig(Section):
    """The bidirectional transformer. `size` fills every field not given explicitly."""

    size: str | None = Field(None, description=f"named size preset: one of {sorted(MODEL_SIZES)}")
    dim: int = Field(256, gt=0, description="model width (hidden size)")
    n_layers: int = Field(4, gt=0, description="number of transformer blocks")
    n_heads: int = Field(4, gt=0, description="attention heads; must divide dim")
    n_kv_heads: int | None = Field(None, gt=0, description="key/value heads (GQA); default n_heads")
    ffn_dim: int = Field(768, gt=0, description="SwiGLU hidden width")
    vocab_size: int = Field(4096, gt=5, description="embedding rows; >= the tokenizer's vocabulary")
    max_seq_len: int = Field(1024, gt=0, description="longest sequence the rotary tables cover")
    rope_theta: float = Field(10000.0, gt=0, description="rotary embedding base")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")
    tie_embeddings: bool = Field(False, description="share input embedding and output projection")
    qkv_bias: bool = Field(False, description="biases on the query/key/value projections (Qwen2 checkpoints)")
    time_conditioning: bool = Field(
        False, description="adaLN conditioning on the diffusion time t (MDLM-DiT); off as in LLaDA"
    )
    cond_dim: int = Field(128, gt=0, description="width of the time embedding when time_conditioning")
    init_std: float = Field(0.02, gt=0, description="std of the normal weight init")
    arch: Literal["unmask", "bert"] = Field(
        "unmask", description="unmask: the blocks above; bert: post-LN BERT/RoBERTa encoder (imported MLMs)"
    )
    shift_logits: bool = Field(
        False, description="AR -> diffusion adaptation (Dream, DiffuLLaMA; mdlm or duo): the logits of position i "
        "come from the hidden state of i-1, so an imported causal LM's head keeps predicting the next token; "
        "position 0 reads its own. Training, sampling, eval and the export all read the network through it")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("size") is not None:
            size = data["size"]
            if size not in MODEL_SIZES:
                raise ValueError(f"unknown size {size!r}; allowed: {sorted(MODEL_SIZES)}")
            return {**MODEL_SIZES[size], **data}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.head_dim % 2 and self.arch == "unmask":
            raise ValueError(f"head_dim={self.head_dim} (dim/n_heads) must be even for rotary embeddings")
        if self.kv_heads > self.n_heads or self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        if self.arch == "bert" and self.qkv_bias:
            raise ValueError("qkv_bias is a field of arch='unmask' (Qwen2 imports); BERT blocks always have biases")
        if self.arch == "bert" and self.shift_logits:
            raise ValueError("shift_logits adapts a causal LM (arch='unmask', `--init-from` a Llama-family model); "
                             "BERT/RoBERTa MLMs already predict each position from itself: set shift_logits=false")
        if self.arch == "bert" and (self.time_conditioning or self.kv_heads != self.n_heads):
            raise ValueError("arch='bert' (BERT/RoBERTa blocks) has no time conditioning and no grouped-query "
                             "attention: set time_conditioning=false and leave n_kv_heads unset")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


class SourceConfig(Section):
    """One source of a weighted training mixture (`[[data.sources]]`)."""

    path: str = Field(..., description="split directory or URL (http(s)://, s3://) with manifest.json and shards")
    weight: float = Field(..., gt=0, description="share of the training samples drawn from it (normalised)")


class DataConfig(Section):
    """Tokenized shards written by `unmask prepare-data`."""

    train_dir: str = Field("data/shards/train",
                           description="directory or URL (http(s)://, s3://) with manifest.json and .tar shards")
    sources: list[SourceConfig] = Field(
        default_factory=list, description="weighted mixture [[data.sources]] path/weight; replaces train_dir"
    )
    retries: int = Field(3, ge=0, description="retries of a failed remote read (backoff 0.5 s, doubling)")
    val_dir: str | None = Field("data/shards/val", description="validation shards; none disables validation")
    num_workers: int = Field(0, ge=0, description="loader worker processes per rank")
    mix_shards: int = Field(
        8, gt=0, description="shards whose samples are shuffled together per epoch (more: better mixing)"
    )
    on_corrupt: Literal["error", "skip"] = Field(
        "error", description="a corrupted shard stops the run (error) or is skipped and counted (skip)"
    )


class OptimConfig(Section):
    """torch AdamW with warmup then decay."""

    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay (not on norms/biases)")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="Adam beta2")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm (0: no clipping)")


class TrainConfig(Section):
    """The training run itself."""

    run_dir: str = Field("runs/default", description="where config, metrics and checkpoints go")
    steps: int = Field(1000, gt=0, description="optimizer steps to train")
    seq_len: int = Field(256, gt=0, description="tokens per sample; must equal the shards' seq_len")
    micro_batch_size: int = Field(8, gt=0, description="samples per forward/backward per rank")
    grad_accum: int = Field(1, gt=0, description="micro-batches accumulated per optimizer step")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 autocast")
    seed: int = Field(0, ge=0, description="seed for init, masking and data order")
    log_every: int = Field(10, gt=0, description="steps between metrics rows")
    val_every: int = Field(200, ge=0, description="steps between validations (0: only at the end)")
    val_batches: int = Field(8, ge=1, description="validation micro-batches per evaluation")
    val_time_samples: int = Field(8, ge=2, description="exact-count draws per validation sequence (>= 2 for "
                                  "val_nelbo_se; 8: SE < 0.01 nat on tiny.toml); validation cost scales with it")
    compile: bool = Field(False, description="torch.compile the model")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="exponential moving average of the weights (MDLM: 0.9999; 0: off), warmed up "
        "as min(decay, (1+n)/(10+n)) after n steps; validation, sample, eval, export and distillation's teacher "
        "use it when the checkpoint has one (--raw-weights / distill.teacher_weights=\"raw\" for the raw weights)")


class LoraConfig(Section):
    """LoRA adapters through peft (unmask/model/lora.py): only the adapters train (and a weight EMA averages only
    them), the base weights stay frozen; checkpoints keep both, every reader of plain weights (sample, eval, export,
    a teacher) gets them merged."""

    rank: int = Field(0, ge=0, description="adapter rank r (0: off, the whole model trains). LoRA normally starts "
                      "from trained weights (--init-from an export); from scratch the frozen base stays random")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the update is B @ A * alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input (0: none, and then data-"
                           "parallel layouts equal one process exactly)")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        description=f"module names adapted in every block, from {list(LORA_TARGETS)} (attention, then MLP)")

    @model_validator(mode="after")
    def _check_targets(self) -> LoraConfig:
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        if unknown or not self.target_modules:
            what = f"unknown names {unknown}" if unknown else "no names"
            raise ValueError(f"lora.target_modules={self.target_modules} has {what}; use names from "
                             f"{list(LORA_TARGETS)}")
        return self


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.diffusion.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"diffusion.schedule={self.diffusion.schedule!r}; allowed: {sorted(SCHEDULE_NAMES)}")
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.model.arch == "bert" and self.parallel.pp > 1:
            raise ValueError(f"parallel.pp={self.parallel.pp} with model.arch='bert': pipeline stages are cut from "
                             "unmask's own blocks; train a BERT/RoBERTa import with pp=1 (tensor parallelism and "
                             "ZeRO work)")
        if self.diffusion.objective == "bd3lm":
            self._check_block_diffusion()
        if self.diffusion.objective == "duo":
            self._check_uniform_state()
        if self.lora.rank:
            self._check_lora()
        self._check_adaptation()
        return self

    def _check_adaptation(self) -> None:
        d, p = self.diffusion, self.parallel
        adaptable = ("mdlm", "duo")  # full-attention diffusion: a causal LM's head and attention carry over
        if self.model.shift_logits and d.objective not in adaptable:
            raise ValueError(f"model.shift_logits adapts a causal LM to diffusion (objective = \"mdlm\" or \"duo\"); "
                             f"diffusion.objective={d.objective!r} reads the network unshifted: set "
                             "model.shift_logits=false or diffusion.objective=\"mdlm\"")
        if d.anneal_steps and d.objective not in adaptable:
            raise ValueError(f"diffusion.anneal_steps={d.anneal_steps} anneals a diffusion model's attention from "
                             f"causal to full (mdlm, duo); diffusion.objective={d.objective!r} has its own fixed "
                             "attention: set diffusion.anneal_steps=0")
        if d.anneal_steps and self.model.arch != "unmask":
            raise ValueError(f"diffusion.anneal_steps={d.anneal_steps} needs the unmask backbone's attention mask "
                             f"input; model.arch={self.model.arch!r} has none: set diffusion.anneal_steps=0")
        if d.anneal_steps and p.pp > 1:
            raise ValueError(f"diffusion.anneal_steps={d.anneal_steps}: pipeline stages do not carry the annealed "
                             f"attention mask (parallel.pp={p.pp}): anneal with pp=1 (tensor parallelism and ZeRO "
                             "work), then continue with pp > 1, or set diffusion.anneal_steps=0")

    def _check_lora(self) -> None:
        p = self.parallel
        if p.tp > 1 or p.pp > 1 or (p.engine == "deepspeed" and p.zero_stage == 3):
            raise ValueError(f"lora.rank={self.lora.rank} runs on the local engine and DeepSpeed ZeRO 0-2 without "
                             f"tensor or pipeline parallelism (parallel.tp={p.tp}, pp={p.pp}, zero_stage="
                             f"{p.zero_stage}): set parallel.tp=1, pp=1, zero_stage<=2, or lora.rank=0")

    def _check_uniform_state(self) -> None:
        m = self.model
        if m.arch != "unmask":
            raise ValueError(f"diffusion.objective='duo' needs the unmask backbone (time conditioning and soft inputs "
                             f"for its curriculum); model.arch={m.arch!r} has neither: use arch='unmask'")
        if not m.time_conditioning:
            raise ValueError("diffusion.objective='duo' needs a time-conditioned network (the uniform-state "
                             "denoiser cannot read the noise level off its input, as a masked one counts masks): "
                             "set model.time_conditioning=true")

    def _check_block_diffusion(self) -> None:
        d, m = self.diffusion, self.model
        if m.time_conditioning:
            raise ValueError("diffusion.objective='bd3lm' gives each block its own time, which one time embedding "
                             "cannot carry (BD3-LM trains without it): set model.time_conditioning=false")
        if m.arch != "unmask":
            raise ValueError(f"diffusion.objective='bd3lm' needs the unmask backbone's block attention; "
                             f"model.arch={m.arch!r} has none: use arch='unmask' or objective='mdlm'")
        if d.block_size > self.train.seq_len:
            raise ValueError(f"diffusion.block_size={d.block_size} is longer than train.seq_len={self.train.seq_len}: "
                             f"use at most {self.train.seq_len} (one block: masked diffusion)")

    @property
    def causal(self) -> bool:
        """Whether the network attends causally: the autoregressive baseline does, every diffusion objective is
        bidirectional."""
        return self.diffusion.objective == "ar"

    @property
    def network_streams(self) -> int:
        """Network positions per data token: 2 under block diffusion (x_t and x_0 side by side), else 1."""
        return 2 if self.block_size else 1

    @property
    def block_size(self) -> int:
        """The network's attention blocks: diffusion.block_size under block diffusion, 0 (none) otherwise."""
        return self.diffusion.block_size if self.diffusion.objective == "bd3lm" else 0

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer prepare-data writes beside the splits: OUT/tokenizer.model, or OUT/tokenizer.json alone when
        the shards use an imported model's own tokenizer (`prepare-data --tokenizer FOLDER`)."""
        out = Path(self.data.train_dir).parent
        spm, hf = out / "tokenizer.model", out / "tokenizer.json"
        return hf if hf.is_file() and not spm.is_file() else spm

    def to_toml(self) -> str:
        return dump_toml(self.model_dump(mode="json", exclude_none=True))

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for tracking params."""
        return {f"{s}.{k}": v for s, sec in self.model_dump(mode="json").items() for k, v in sec.items()}


# ---------------------------------------------------------------------------------------------- loading


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """`--section.key=value` (value parsed as TOML, else kept as a string) -> nested dict."""
    out: dict[str, dict[str, Any]] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"override {arg!r} is not of the form --section.key=value")
        key, raw = arg[2:].split("=", 1)
        section, _, field = key.partition(".")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[field] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a TOML preset, apply overrides, validate. Raises ConfigError with one readable line."""
    data: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        for section, fields in extra.items():
            if not isinstance(data.get(section, {}), dict):
                raise ConfigError(f"{section} is not a config section")
            data.setdefault(section, {}).update(fields)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe(e)}") from None


def load_config_text(text: str, where: str) -> Config:
    """Validate a resolved config saved as TOML text (in a checkpoint or run directory)."""
    try:
        return Config.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        detail = describe(e) if isinstance(e, ValidationError) else str(e)
        raise ConfigError(f"{where}: saved config is not valid: {detail}") from None


def describe(error: ValidationError) -> str:
    """The first pydantic error as `key=value: problem` (sibling errors follow the same fix)."""
    err = error.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r}; check the spelling against `unmask train --help-config`"
    if err["type"] == "missing":
        return f"missing key {key!r}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f"={json.dumps(value, default=str)}"
    return f"{key}{shown}: {msg}"


def dump_toml(data: dict[str, dict[str, Any]]) -> str:
    """Minimal TOML writer for our flat sections (tomllib only reads)."""
    lines: list[str] = []
    for section, fields in data.items():
        lines.append(f"[{section}]")
        for key, value in fields.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def config_help() -> str:
    """Every field with its type, default and description, for `--help-config`."""
    rows = []
    for name, field in Config.model_fields.items():
        section = field.annotation
        rows.append(f"[{name}]  {section.__doc__.strip().splitlines()[0]}")
        for key, f in section.model_fields.items():
            rows.append(f"  {name}.{key} = {f.default!r:<12} {f.description}")
    return "\n".join(rows)
