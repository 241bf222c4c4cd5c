"""The distillation loop: the pretraining loop's building blocks (loader, engine, checkpointer, reporter, step keys,
validation) around a distillation objective that holds the frozen teacher.

Training runs `distill.rounds` rounds of `distill.steps_per_round` optimizer steps. At each round boundary the
student's weights are copied into the teacher and the teacher's sampling steps halve. The round, the teacher's
steps and the teacher's weights are saved with every checkpoint, so a resume mid-round is exact.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from unmask.config import Config
from unmask.diffusion.objective import MaskedDiffusion
from unmask.distill.objective import build_distill_objective, frozen_copy
from unmask.engines import build_engine
from unmask.engines.optim import set_peak_lr
from unmask.errors import ConfigError
from unmask.model.transformer import build_model
from unmask.train.checkpoint import Checkpointer, config_hash, rng_state, set_rng_state
from unmask.train.loop import load_validation, make_loader, start_run, step_keys, validate
from unmask.train.report import Reporter


@dataclass
class DistillProgress:
    """Counters saved in every distillation checkpoint's meta.json."""

    step: int = 0
    round: int = 0
    teacher_steps: int = 0  # the teacher's sampling steps this round
    skipped_steps: int = 0
    mlflow_run_id: str | None = None


def prepare_config(cfg: Config, teacher: str | None) -> tuple[Config, dict]:
    """The run's config (the teacher's model shape, train.steps = rounds x steps_per_round) and the teacher's
    weights. Refuses layouts whose student weights are not whole on each rank (the teacher copy needs them)."""
    from unmask.train.consolidate import load_checkpoint_weights

    path = teacher or cfg.distill.teacher
    if not path:
        raise ConfigError("distill: no teacher: pass --teacher CHECKPOINT or set distill.teacher")
    if cfg.parallel.tp > 1 or cfg.parallel.pp > 1 or cfg.parallel.zero_stage == 3:
        raise ConfigError(f"distill: parallel.tp={cfg.parallel.tp}, pp={cfg.parallel.pp}, "
                          f"zero_stage={cfg.parallel.zero_stage}: distillation needs whole weights on each rank "
                          "(use data parallelism with zero_stage <= 2)")
    teacher_cfg, state = load_checkpoint_weights(path)
    if teacher_cfg.diffusion.objective != "mdlm":
        raise ConfigError(f"distill: teacher {path} is a {teacher_cfg.diffusion.objective!r} model; it must be a "
                          "masked-diffusion (mdlm) checkpoint")
    cfg = cfg.model_copy(deep=True)
    cfg.model = teacher_cfg.model
    cfg.diffusion = teacher_cfg.diffusion
    cfg.distill.teacher = str(path)
    cfg.train.steps = cfg.distill.rounds * cfg.distill.steps_per_round
    return cfg, state


def distill(cfg: Config, teacher: str | None = None, stop_at: int | None = None) -> dict:
    """Distil the teacher checkpoint into a student initialised from it; returns the last validation row.
    `stop_at`: save and return after this step (a kill-free interruption, for resume tests)."""
    cfg, teacher_state = prepare_config(cfg, teacher)
    dims, run_dir, device = start_run(cfg)
    loader = make_loader(cfg, dims, cfg.data.train_dir, loop=True)
    special = loader.manifest.special
    val_batches = load_validation(cfg, dims)
    model = build_model(cfg.model, device=device)
    model.load_state_dict(teacher_state)  # the student starts as the teacher
    diffusion = MaskedDiffusion(cfg.diffusion, special.mask, special.pad, cfg.train.seed, cfg.model.time_conditioning)
    objective = build_distill_objective(cfg.distill, diffusion, frozen_copy(model, cfg.distill.teacher_dtype))
    engine = build_engine(cfg, model, objective, dims)
    ckpt = Checkpointer(run_dir, cfg.checkpoint, dims.rank, dims.world_size)

    progress = DistillProgress(teacher_steps=cfg.distill.start_steps)
    resume_from = ckpt.find(cfg.checkpoint.resume)
    if resume_from:
        meta, client = ckpt.load(resume_from, engine, cfg)
        loader.load_state_dict(client["loader"])
        set_rng_state(client["rng"])
        objective.replace_teacher(client["teacher"])
        progress = DistillProgress(**{k: v for k, v in meta.items() if k in DistillProgress.__dataclass_fields__})
        set_peak_lr(engine.scheduler, cfg.optim.lr)
    objective.set_round(progress.round)
    report = Reporter(cfg, run_dir, dims.is_main, progress.step, progress.mlflow_run_id)
    progress.mlflow_run_id = report.run_id
    say = report.note
    if resume_from:
        say(f"unmask distill: resumed from {resume_from} at step {progress.step} (round {progress.round})")
    say(f"unmask distill: {cfg.distill.objective} from {cfg.distill.teacher}, {cfg.distill.rounds} rounds "
        f"{cfg.distill.start_steps} -> {cfg.distill.final_steps} steps, run dir {run_dir}")

    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * dims.dp * cfg.train.seq_len
    batches = iter(loader)
    last_val: dict = {}
    status = "FAILED"

    def save() -> None:
        meta = {**asdict(progress), "tokens": progress.step * tokens_per_step, "config": cfg.to_toml(),
                "config_hash": config_hash(cfg), "saved_at": time.time(), "stage": "distill",
                "layout": {"world": dims.world_size, "dp": dims.dp, "tp": dims.tp, "pp": dims.pp}}
        client = {"loader": loader.state_dict(), "rng": rng_state(), "teacher": objective.teacher.state_dict()}
        say(f"unmask distill: saved {ckpt.save(progress.step, engine, meta, client)}")

    try:
        total = cfg.train.steps
        while progress.step < total:
            micro = list(itertools.islice(batches, cfg.train.grad_accum))
            stats = engine.train_step(micro, step_keys(cfg, dims, progress.step))
            progress.step += 1
            progress.skipped_steps += stats.skipped
            done = progress.step
            if done % cfg.train.log_every == 0 or done == total:
                report.row({"step": done, "tokens": done * tokens_per_step, "loss": stats.loss, "lr": stats.lr,
                            "grad_norm": stats.grad_norm, "round": progress.round,
                            "teacher_steps": progress.teacher_steps, "skipped_steps": progress.skipped_steps})
            if done % cfg.distill.steps_per_round == 0 and done < total:
                next_round(objective, engine, progress, say)
            val_due = cfg.train.val_every and done % cfg.train.val_every == 0
            if val_batches and (val_due or done == total):
                last_val = {"step": done, **validate(engine, val_batches, cfg, dims, special.pad)}
                report.row(last_val)
            if done == total or done == stop_at or ckpt.due(done):
                save()
            if done == stop_at:
                break
        if progress.step == total and cfg.distill.eval and dims.is_main:
            from unmask.distill.evaluate import evaluate_run

            evaluate_run(cfg, engine.model, run_dir, say)
        status = "FINISHED"
    finally:
        tokenizer = Path(cfg.data.train_dir).parent / "tokenizer.model"
        report.finish(status, {"config": [run_dir / "config.toml"], "tokenizer": [tokenizer]})
    return last_val


def next_round(objective, engine, progress: DistillProgress, say) -> None:
    """The student so far becomes the teacher; the teacher's sampling steps halve."""
    objective.replace_teacher({k: v.detach().clone() for k, v in engine.model.state_dict().items()})
    progress.round += 1
    objective.set_round(progress.round)
    progress.teacher_steps = objective.steps
    say(f"unmask distill: round {progress.round}: teacher replaced by the student, {progress.teacher_steps} steps")
