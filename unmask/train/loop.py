"""The one step loop every stage runs through (pretraining, distillation, ...). It delegates: the loader gives
batches, the engine steps, the checkpointer saves and restores, the reporter records, the stage adds what is
its own (unmask.train.stage). One optimizer step = `grad_accum` micro-batches of `micro_batch_size` samples on
each data-parallel rank.

A step whose loss or gradient norm is not finite applies no update (the step still consumes its data and
counts, the LR schedule does not advance); `checkpoint.max_bad_steps` such steps in a row roll the run back to
the last checkpoint, with the lr scaled by `checkpoint.rollback_lr_scale`. No checkpoint is written from a skipped
step: an interval save waits for the next good step. SIGTERM / SIGUSR1 / SIGINT finish the step, save (unless it
was skipped) and exit with REQUEUE_EXIT_CODE; a rank that cannot finish its step (blocked in a collective) is ended
by the preemption watchdog after `launch.preempt_grace_seconds`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from unmask import faults
from unmask.checkpoint import Checkpointer, config_hash, rng_state, set_rng_state
from unmask.config import Config
from unmask.data.loader import ShardLoader
from unmask.diffusion.noise import BatchKey
from unmask.engines import Engine, build_components
from unmask.engines.optim import set_peak_lr
from unmask.errors import CheckpointError
from unmask.launcher.env import REQUEUE_EXIT_CODE
from unmask.model.counting import param_count, train_flops_per_token
from unmask.parallel import collective
from unmask.parallel.dims import ParallelDims, setup_parallel, teardown_parallel
from unmask.train.batches import tensor_parallel_batches
from unmask.train.ema import EMA
from unmask.train.metrics import Throughput, device_peak_flops, peak_memory_bytes
from unmask.train.preemption import Preemption
from unmask.train.report import Reporter
from unmask.train.stage import Pretrain, Stage
from unmask.train.validation import load_validation, make_loader, validate_with

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


def train(cfg: Config, init_state: dict | None = None, stage: Stage | None = None) -> dict:
    """Run `stage` (pretraining by default) as configured, from `init_state` weights if given (--init-from; a
    resume overrides them); returns the last validation row (empty if validation is off)."""
    stage = stage or Pretrain()
    cfg, init_state = stage.prepare(cfg, init_state)
    dims, run_dir, device = start_run(cfg)
    # Tensor-parallel peers share one reader (unmask/train/batches.py); `loader` is its view for this rank.
    loader = tensor_parallel_batches(make_loader(cfg, dims, cfg.data.train_dir, loop=True), dims)
    special = loader.manifest.special
    val_batches = load_validation(cfg, dims)
    engine = build_components(cfg, dims, device, special, init_state, stage.wrap_objective).engine
    ema = EMA(engine.local_weights, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    ckpt = Checkpointer(run_dir, cfg.checkpoint, dims.rank, dims.world_size)

    progress = Progress()
    resume_from = ckpt.find(cfg.checkpoint.resume)
    if resume_from:
        progress = restore(ckpt, resume_from, engine, loader, cfg, stage, ema)
    set_peak_lr(engine.scheduler, cfg.optim.lr * progress.lr_scale)
    report = Reporter(cfg, run_dir, dims.is_main, progress.step, progress.mlflow_run_id)
    progress.mlflow_run_id = report.run_id
    prefix = "unmask" if stage.name == "pretrain" else f"unmask {stage.name}"

    def say(text: str) -> None:
        report.note(f"{prefix}: {text}")

    if resume_from:
        say(f"resumed from {resume_from} at step {progress.step}")
    say(f"{param_count(cfg.model) / 1e6:.2f}M parameters, {cfg.diffusion.objective} objective, run dir {run_dir}")
    if stage.describe():
        say(stage.describe())

    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * dims.dp * cfg.train.seq_len
    peak = device_peak_flops(device, cfg.train.dtype) if dims.is_main else None
    meter = Throughput(train_flops_per_token(cfg.model, cfg.train.seq_len, cfg.network_streams), peak,
                       devices=dims.world_size)
    preemption = Preemption(cfg.launch.preempt_grace_seconds)
    batches = iter(loader)
    last_val: dict = {}
    save_pending = False
    status = "FAILED"

    def save() -> None:
        meta = {**asdict(progress), **stage.log_fields(), "stage": stage.name, "config": cfg.to_toml(),
                "tokens": progress.step * tokens_per_step, "config_hash": config_hash(cfg), "saved_at": time.time(),
                "layout": {"world": dims.world_size, "dp": dims.dp, "tp": dims.tp, "pp": dims.pp}}
        client = {"loader": loader.state_dict(), "rng": rng_state(), "stage": stage.state_dict()}
        say(f"saved {ckpt.save(progress.step, engine, meta, client, ema)}")

    try:
        while progress.step < cfg.train.steps:
            micro = list(itertools.islice(batches, cfg.train.grad_accum))
            stats = engine.train_step(micro, step_keys(cfg, dims, progress.step))
            stats.skipped = collective.any_rank(stats.skipped)  # every rank must take the same save/rollback path
            meter.add(tokens_per_step)
            progress.step += 1
            if stats.skipped and handle_bad_step(progress, cfg, say):
                progress = rollback(ckpt, engine, loader, cfg, stage, progress, say, ema)
                batches = iter(loader)
                continue
            if not stats.skipped:
                progress.bad_in_row = progress.rollbacks_in_row = 0
                if ema:
                    ema.update()
            done = progress.step
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                report.row({"step": done, "tokens": done * tokens_per_step, "loss": stats.loss, "lr": stats.lr,
                            "grad_norm": stats.grad_norm, "skipped_steps": progress.skipped_steps,
                            "skipped_shards": loader.skipped_shards, **stage.log_fields(), **meter.read(),
                            **loader.log_fields(), "peak_mem_gib": round(peak_memory_bytes() / 2**30, 3)})
            stage.after_step(done, engine, say)
            val_due = cfg.train.val_every and done % cfg.train.val_every == 0
            if val_batches and (val_due or done == cfg.train.steps):
                last_val = {"step": done, **validate_with(ema, engine, val_batches, cfg, dims, special.pad)}
                report.row(last_val)
                meter.reset()
            faults.hit("step.end", done)
            if preemption.requested():
                # After a skipped step nothing is saved: if the skip was detected late (an update applied with a
                # NaN norm) the weights are bad, and a requeued run simply resumes from the last good checkpoint.
                if stats.skipped:
                    say(f"preempted after a skipped step; not saving it, exiting with {REQUEUE_EXIT_CODE} to requeue "
                        "from the last checkpoint")
                else:
                    save()
                    say(f"preempted; checkpoint saved, exiting with {REQUEUE_EXIT_CODE} to requeue")
                status = "KILLED"
                raise Preempted()
            # Never save from a step whose update was not finite: an interval save falls due on the next good step.
            save_pending = ckpt.due(done) or save_pending or done == cfg.train.steps
            if save_pending and not stats.skipped:
                save()
                save_pending = False
        stage.finish(cfg, engine, run_dir, dims.is_main, say)
        status = "FINISHED"
    finally:
        preemption.restore()
        report.finish(status, {"config": [run_dir / "config.toml"], "tokenizer": [cfg.tokenizer_path]})
        if status != "FAILED":  # finished or preempted: every rank is here together (a failure may have left a peer
            teardown_parallel()  # blocked in a collective, and a barrier would wait for it)
    return last_val


def start_run(cfg: Config) -> tuple[ParallelDims, Path, torch.device]:
    """Process groups, the run directory with its resolved config, threads, seed, device."""
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
    say(f"step {progress.step}: non-finite loss or gradient, update skipped ({progress.bad_in_row} in a row)")
    return 0 < cfg.checkpoint.max_bad_steps <= progress.bad_in_row


def rollback(ckpt: Checkpointer, engine: Engine, loader: ShardLoader, cfg: Config, stage: Stage,
             progress: Progress, say, ema: EMA | None = None) -> Progress:
    path = ckpt.find("auto")
    if path is None:
        raise CheckpointError(f"{progress.bad_in_row} non-finite steps in a row at step {progress.step} and no "
                              f"checkpoint in {ckpt.root} to roll back to; lower optim.lr or set "
                              "checkpoint.interval_steps")
    if progress.rollbacks_in_row >= MAX_ROLLBACKS:
        raise CheckpointError(f"rolled back to {path} {MAX_ROLLBACKS} times and the loss is still not finite; "
                              "lower optim.lr or checkpoint.rollback_lr_scale")
    restored = restore(ckpt, path, engine, loader, cfg, stage, ema)
    restored.lr_scale = progress.lr_scale * cfg.checkpoint.rollback_lr_scale
    restored.skipped_steps = progress.skipped_steps
    restored.rollbacks_in_row = progress.rollbacks_in_row + 1
    restored.mlflow_run_id = progress.mlflow_run_id
    set_peak_lr(engine.scheduler, cfg.optim.lr * restored.lr_scale)
    say(f"rolled back to {path} (step {restored.step}), lr scale {restored.lr_scale}")
    return restored


def restore(ckpt: Checkpointer, path: Path, engine: Engine, loader: ShardLoader, cfg: Config,
            stage: Stage | None = None, ema: EMA | None = None) -> Progress:
    """Engine, EMA, loader position, RNG and stage state from `path`; returns the saved counters."""
    meta, client = ckpt.load(path, engine, cfg, ema)
    loader.load_state_dict(client["loader"])
    set_rng_state(client["rng"])
    (stage or Pretrain()).load_state_dict(client.get("stage", {}))
    fields = Progress.__dataclass_fields__
    return Progress(**{k: v for k, v in meta.items() if k in fields})


def step_keys(cfg: Config, dims: ParallelDims, step: int) -> list[BatchKey]:
    mb = cfg.train.micro_batch_size
    global_batch = mb * cfg.train.grad_accum * dims.dp
    return [BatchKey(step, m, dims.dp_rank, dims.dp, global_batch) for m in range(cfg.train.grad_accum)]
