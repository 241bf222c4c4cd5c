"""The pretraining loop. It delegates: the loader gives batches, the engine steps, the checkpointer saves and
restores, the log records. One optimizer step = `grad_accum` micro-batches of `micro_batch_size` samples on each
data-parallel rank.

A step whose loss or gradient norm is not finite applies no update (the step still consumes its data and
counts, the LR schedule does not advance); `checkpoint.max_bad_steps` such steps in a row roll the run back to
the last checkpoint, with the lr scaled by `checkpoint.rollback_lr_scale`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from unmask.config import Config
from unmask.data.loader import ShardLoader
from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import build_objective
from unmask.engines import Engine, build_engine
from unmask.engines.optim import set_peak_lr
from unmask.errors import CheckpointError
from unmask.launcher.env import REQUEUE_EXIT_CODE
from unmask.model.counting import param_count, train_flops_per_token
from unmask.model.transformer import build_model
from unmask.parallel.dims import ParallelDims, setup_parallel
from unmask.train.checkpoint import Checkpointer, config_hash, rng_state, set_rng_state
from unmask.train.metrics import Throughput, device_peak_flops, peak_memory_bytes, perplexity, unigram_entropy
from unmask.train.preemption import Preemption
from unmask.train.report import Reporter

VAL_SEED = 1_000_003  # the validation noise stream, apart from training steps
MAX_ROLLBACKS = 3  # rollbacks to the same step in a row before giving up


@dataclass
class Progress:
    """Counters saved in every checkpoint's meta.json."""

    step: int = 0
    lr_scale: float = 1.0
    skipped_steps: int = 0
    bad_in_row: int = 0
    rollbacks_in_row: int = 0
    mlflow_run_id: str | None = None


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(REQUEUE_EXIT_CODE)


def train(cfg: Config, init_state: dict | None = None) -> dict:
    """Train as configured, from `init_state` weights if given (--init-from; a resume overrides them); returns
    the last validation row (empty if validation is off)."""
    dims, run_dir, device = start_run(cfg)
    loader = make_loader(cfg, dims, cfg.data.train_dir, loop=True)
    special = loader.manifest.special
    val_batches = load_validation(cfg, dims)
    model = build_model(cfg.model, causal=cfg.diffusion.objective == "ar", device=device)
    if init_state is not None:
        model.load_state_dict(init_state)
    objective = build_objective(cfg.diffusion, special.mask, special.pad, cfg.train.seed,
                                cfg.model.time_conditioning)
    engine = build_engine(cfg, model, objective, dims)
    ckpt = Checkpointer(run_dir, cfg.checkpoint, dims.rank, dims.world_size)

    progress = Progress()
    resume_from = ckpt.find(cfg.checkpoint.resume)
    if resume_from:
        progress = restore(ckpt, resume_from, engine, loader, cfg)
    set_peak_lr(engine.scheduler, cfg.optim.lr * progress.lr_scale)
    report = Reporter(cfg, run_dir, dims.is_main, progress.step, progress.mlflow_run_id)
    progress.mlflow_run_id = report.run_id
    say = report.note
    if resume_from:
        say(f"unmask: resumed from {resume_from} at step {progress.step}")
    say(f"unmask: {param_count(cfg.model) / 1e6:.2f}M parameters, {cfg.diffusion.objective} objective, "
        f"run dir {run_dir}")

    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * dims.dp * cfg.train.seq_len
    peak = device_peak_flops(device, cfg.train.dtype) if dims.is_main else None
    meter = Throughput(train_flops_per_token(cfg.model, cfg.train.seq_len), peak, devices=dims.world_size)
    preemption = Preemption()
    batches = iter(loader)
    last_val: dict = {}
    status = "FAILED"

    def save() -> None:
        meta = {**asdict(progress), "tokens": progress.step * tokens_per_step, "config": cfg.to_toml(),
                "config_hash": config_hash(cfg), "saved_at": time.time(),
                "layout": {"world": dims.world_size, "dp": dims.dp, "tp": dims.tp, "pp": dims.pp}}
        path = ckpt.save(progress.step, engine, meta, {"loader": loader.state_dict(), "rng": rng_state()})
        say(f"unmask: saved {path}")

    try:
        while progress.step < cfg.train.steps:
            micro = list(itertools.islice(batches, cfg.train.grad_accum))
            stats = engine.train_step(micro, step_keys(cfg, dims, progress.step))
            meter.add(tokens_per_step)
            progress.step += 1
            if stats.skipped and handle_bad_step(progress, cfg, say):
                progress = rollback(ckpt, engine, loader, cfg, progress, say)
                batches = iter(loader)
                continue
            if not stats.skipped:
                progress.bad_in_row = progress.rollbacks_in_row = 0
            done = progress.step
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                row = {"step": done, "tokens": done * tokens_per_step, "loss": stats.loss,
                       "lr": stats.lr, "grad_norm": stats.grad_norm, "skipped_steps": progress.skipped_steps,
                       "skipped_shards": loader.skipped_shards, **meter.read(),
                       "peak_mem_gib": round(peak_memory_bytes() / 2**30, 3)}
                report.row(row)
            val_due = cfg.train.val_every and done % cfg.train.val_every == 0
            if val_batches and (val_due or done == cfg.train.steps):
                last_val = {"step": done, **validate(engine, val_batches, cfg, dims, special.pad)}
                report.row(last_val)
                meter.reset()
            if preemption.requested():
                save()
                say(f"unmask: preempted; checkpoint saved, exiting with {REQUEUE_EXIT_CODE} to requeue")
                status = "KILLED"
                raise Preempted()
            if done == cfg.train.steps or ckpt.due(done):
                save()
        status = "FINISHED"
    finally:
        preemption.restore()
        tokenizer = Path(cfg.data.train_dir).parent / "tokenizer.model"
        report.finish(status, {"config": [run_dir / "config.toml"], "tokenizer": [tokenizer]})
    return last_val


def start_run(cfg: Config) -> tuple[ParallelDims, Path, torch.device]:
    """What every stage does first: process groups, the run directory with its resolved config, threads, seed,
    device."""
    dims = setup_parallel(cfg)
    run_dir = Path(cfg.train.run_dir)
    if dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(cfg.to_toml())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    return dims, run_dir, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def handle_bad_step(progress: Progress, cfg: Config, say) -> bool:
    """Count a skipped step; True when it is time to roll back."""
    progress.skipped_steps += 1
    progress.bad_in_row += 1
    say(f"unmask: step {progress.step}: non-finite loss or gradient, update skipped "
        f"({progress.bad_in_row} in a row)")
    return 0 < cfg.checkpoint.max_bad_steps <= progress.bad_in_row


def rollback(ckpt: Checkpointer, engine, loader, cfg: Config, progress: Progress, say) -> Progress:
    path = ckpt.find("auto")
    if path is None:
        raise CheckpointError(f"{progress.bad_in_row} non-finite steps in a row at step {progress.step} and no "
                              f"checkpoint in {ckpt.root} to roll back to; lower optim.lr or set "
                              "checkpoint.interval_steps")
    if progress.rollbacks_in_row >= MAX_ROLLBACKS:
        raise CheckpointError(f"rolled back to {path} {MAX_ROLLBACKS} times and the loss is still not finite; "
                              "lower optim.lr or checkpoint.rollback_lr_scale")
    restored = restore(ckpt, path, engine, loader, cfg)
    restored.lr_scale = progress.lr_scale * cfg.checkpoint.rollback_lr_scale
    restored.skipped_steps = progress.skipped_steps
    restored.rollbacks_in_row = progress.rollbacks_in_row + 1
    set_peak_lr(engine.scheduler, cfg.optim.lr * restored.lr_scale)
    restored.mlflow_run_id = progress.mlflow_run_id
    say(f"unmask: rolled back to {path} (step {restored.step}), lr scale {restored.lr_scale}")
    return restored


def restore(ckpt: Checkpointer, path: Path, engine: Engine, loader: ShardLoader, cfg: Config) -> Progress:
    meta, client = ckpt.load(path, engine, cfg)
    loader.load_state_dict(client["loader"])
    set_rng_state(client["rng"])
    fields = Progress.__dataclass_fields__
    return Progress(**{k: v for k, v in meta.items() if k in fields})


def step_keys(cfg: Config, dims: ParallelDims, step: int) -> list[BatchKey]:
    mb = cfg.train.micro_batch_size
    global_batch = mb * cfg.train.grad_accum * dims.dp
    return [BatchKey(step, m, dims.dp_rank, dims.dp, global_batch) for m in range(cfg.train.grad_accum)]


def make_loader(cfg: Config, dims: ParallelDims, split_dir: str, loop: bool) -> ShardLoader:
    return ShardLoader(split_dir, cfg.train.micro_batch_size, seq_len=cfg.train.seq_len,
                       model_vocab_size=cfg.model.vocab_size, dp_rank=dims.dp_rank, dp_world=dims.dp,
                       seed=cfg.train.seed, num_workers=cfg.data.num_workers if loop else 0, loop=loop,
                       shuffle=loop, on_corrupt=cfg.data.on_corrupt, mix_shards=cfg.data.mix_shards)


def load_validation(cfg: Config, dims: ParallelDims) -> list[torch.Tensor]:
    """The first `val_batches` validation micro-batches of this rank, read once and kept in memory."""
    if not cfg.data.val_dir:
        return []
    loader = make_loader(cfg, dims, cfg.data.val_dir, loop=False)
    return list(itertools.islice(iter(loader), cfg.train.val_batches))


def validate(engine: Engine, val_batches: list[torch.Tensor], cfg: Config, dims: ParallelDims, pad_id: int) -> dict:
    """Deterministic NELBO (nats/token) over the held-out batches, its perplexity bound, and the unigram
    entropy of the same tokens (a model that ignores context scores exactly that)."""
    nll, tokens = 0.0, 0
    mb = cfg.train.micro_batch_size
    for i, x0 in enumerate(val_batches):  # keys give each held-out sample the same noise in any layout
        key = BatchKey(VAL_SEED, i, dims.dp_rank, dims.dp, mb * dims.dp * len(val_batches))
        per_seq, counts = engine.eval_terms(x0, cfg.train.val_time_samples, key)
        nll += float(per_seq.sum())
        tokens += int(counts.sum())
    reduce = getattr(engine, "all_reduce_dp", None)  # sum over data-parallel ranks
    nll, tokens = reduce([nll, tokens]) if reduce else (nll, tokens)
    nelbo = nll / max(tokens, 1)
    return {"val_nelbo": round(nelbo, 5), "val_ppl_bound": round(perplexity(nelbo), 3),
            "val_unigram_entropy": round(unigram_entropy(val_batches, pad_id), 5), "val_tokens": int(tokens)}
