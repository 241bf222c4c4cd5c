"""The pretraining loop. It delegates: the loader gives batches, the engine steps, the log records.

One optimizer step = `grad_accum` micro-batches of `micro_batch_size` samples on each data-parallel rank.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

from unmask.config import Config
from unmask.data.loader import ShardLoader
from unmask.diffusion.noise import BatchKey
from unmask.diffusion.objective import build_objective
from unmask.model.counting import param_count, train_flops_per_token
from unmask.model.transformer import build_model
from unmask.parallel.dims import ParallelDims, setup_parallel
from unmask.train.engine import Engine, build_engine
from unmask.train.metrics import MetricsLog, Throughput, perplexity, unigram_entropy


def train(cfg: Config) -> dict:
    """Train as configured; returns the last validation row (empty if validation is off)."""
    dims = setup_parallel(cfg)
    run_dir = Path(cfg.train.run_dir)
    if dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(cfg.to_toml())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)

    loader = make_loader(cfg, dims, cfg.data.train_dir, loop=True)
    special = loader.manifest.special
    val_batches = load_validation(cfg, dims)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, causal=cfg.diffusion.objective == "ar", device=device)
    objective = build_objective(cfg.diffusion, special.mask, special.pad, cfg.train.seed,
                                cfg.model.time_conditioning)
    engine = build_engine(cfg, model, objective, dims)

    log = MetricsLog(run_dir / "metrics.jsonl", enabled=dims.is_main)
    say = print if dims.is_main else (lambda *a, **k: None)
    say(f"unmask: {param_count(cfg.model) / 1e6:.2f}M parameters, {cfg.diffusion.objective} objective, "
        f"run dir {run_dir}", flush=True)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * dims.dp * cfg.train.seq_len
    meter = Throughput(train_flops_per_token(cfg.model, cfg.train.seq_len))
    batches = iter(loader)
    last_val: dict = {}
    for step in range(cfg.train.steps):
        micro = list(itertools.islice(batches, cfg.train.grad_accum))
        stats = engine.train_step(micro, step_keys(cfg, dims, step))
        meter.add(tokens_per_step)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            row = {"step": done, "tokens": done * tokens_per_step, "loss": round(stats.loss, 5),
                   "lr": stats.lr, "grad_norm": round(stats.grad_norm, 4), "skipped": stats.skipped,
                   **meter.read()}
            log.write(row)
            say(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        val_due = cfg.train.val_every and done % cfg.train.val_every == 0
        if val_batches and (val_due or done == cfg.train.steps):
            last_val = {"step": done, **validate(engine, val_batches, cfg, special.pad)}
            log.write(last_val)
            say(" ".join(f"{k}={v}" for k, v in last_val.items()), flush=True)
            meter.reset()
    sys.stdout.flush()
    return last_val


def step_keys(cfg: Config, dims: ParallelDims, step: int) -> list[BatchKey]:
    mb = cfg.train.micro_batch_size
    global_batch = mb * cfg.train.grad_accum * dims.dp
    return [BatchKey(step, m * mb, dims.dp_rank, dims.dp, global_batch) for m in range(cfg.train.grad_accum)]


def make_loader(cfg: Config, dims: ParallelDims, split_dir: str, loop: bool) -> ShardLoader:
    return ShardLoader(split_dir, cfg.train.micro_batch_size, seq_len=cfg.train.seq_len,
                       model_vocab_size=cfg.model.vocab_size, dp_rank=dims.dp_rank, dp_world=dims.dp,
                       seed=cfg.train.seed, num_workers=cfg.data.num_workers if loop else 0, loop=loop,
                       shuffle=loop, on_corrupt=cfg.data.on_corrupt)


def load_validation(cfg: Config, dims: ParallelDims) -> list[torch.Tensor]:
    """The first `val_batches` validation micro-batches of this rank, read once and kept in memory."""
    if not cfg.data.val_dir:
        return []
    loader = make_loader(cfg, dims, cfg.data.val_dir, loop=False)
    return list(itertools.islice(iter(loader), cfg.train.val_batches))


def validate(engine: Engine, val_batches: list[torch.Tensor], cfg: Config, pad_id: int) -> dict:
    """Deterministic NELBO (nats/token) over the held-out batches, its perplexity bound, and the unigram
    entropy of the same tokens (a model that ignores context scores exactly that)."""
    nll, tokens = 0.0, 0
    for i, x0 in enumerate(val_batches):
        per_seq, counts = engine.eval_terms(x0, cfg.train.val_time_samples, seed=1_000_003 + i)
        nll += float(per_seq.sum())
        tokens += int(counts.sum())
    nll, tokens = engine_all_reduce(engine, nll, tokens)
    nelbo = nll / max(tokens, 1)
    return {"val_nelbo": round(nelbo, 5), "val_ppl_bound": round(perplexity(nelbo), 3),
            "val_unigram_entropy": round(unigram_entropy(val_batches, pad_id), 5), "val_tokens": tokens}


def engine_all_reduce(engine: Engine, *values: float) -> tuple:
    """Sum scalars over data-parallel ranks when the engine is distributed."""
    reduce = getattr(engine, "all_reduce_dp", None)
    return tuple(reduce(list(values))) if reduce else values
