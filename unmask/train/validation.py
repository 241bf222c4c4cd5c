"""Held-out evaluation inside a run: the same validation batches and noise in every layout and after a resume."""

from __future__ import annotations

import itertools
import math

import torch

from unmask.config import Config
from unmask.data.loader import ShardLoader
from unmask.diffusion.noise import BatchKey
from unmask.errors import ConfigError
from unmask.parallel.dims import ParallelDims
from unmask.train.metrics import perplexity, unigram_entropy

VAL_SEED = 1_000_003  # the validation noise stream, apart from training steps


def make_loader(cfg: Config, dims: ParallelDims, split_dir: str, loop: bool) -> ShardLoader:
    """This rank's loader of a split: looping and shuffled for training, one ordered pass for validation."""
    loader = ShardLoader(split_dir, cfg.train.micro_batch_size, seq_len=cfg.train.seq_len,
                       model_vocab_size=cfg.model.vocab_size, dp_rank=dims.dp_rank, dp_world=dims.dp,
                       seed=cfg.train.seed, num_workers=cfg.data.num_workers if loop else 0, loop=loop,
                       shuffle=loop, on_corrupt=cfg.data.on_corrupt, mix_shards=cfg.data.mix_shards,
                       retries=cfg.data.retries,
                       sources=[(s.path, s.weight) for s in cfg.data.sources] if loop and cfg.data.sources else None)
    check_sft_split(cfg, loader.manifest.sft is not None, split_dir if not (loop and cfg.data.sources) else
                    "data.sources")
    return loader


def check_sft_split(cfg: Config, sft: bool, where: str) -> None:
    """SFT splits (prompt masks) train only with diffusion.prompt_conditioned, and it only with them: either
    mismatch would silently train another objective (prompts masked and scored, or per-sample normalisation
    of plain text)."""
    if sft and not cfg.diffusion.prompt_conditioned:
        raise ConfigError(f"{where} is an SFT split (prepare-data --format chat) but diffusion.prompt_conditioned is "
                          "false, which would mask and score the prompts like answers; set "
                          "diffusion.prompt_conditioned = true")
    if not sft and cfg.diffusion.prompt_conditioned:
        raise ConfigError(f"diffusion.prompt_conditioned = true (SFT) but {where} holds pretraining samples without "
                          "prompt masks; prepare the data with `unmask prepare-data --format chat`, or set "
                          "diffusion.prompt_conditioned = false")


def load_validation(cfg: Config, dims: ParallelDims) -> list[torch.Tensor]:
    """The first `val_batches` validation micro-batches of this rank, read once and kept in memory."""
    if not cfg.data.val_dir:
        return []
    loader = make_loader(cfg, dims, cfg.data.val_dir, loop=False)
    return list(itertools.islice(iter(loader), cfg.train.val_batches))


def validate(engine, val_batches: list, cfg: Config, dims: ParallelDims, pad_id: int) -> dict:
    """Deterministic NELBO (nats/token) over the held-out batches (the exact-count estimator whatever the training
    one), its Monte-Carlo standard error, its perplexity bound, and the unigram entropy of the same tokens (a
    model that ignores context scores exactly that). On an SFT split (batches of (tokens, prompt_mask)) these are
    the responses' figures given their prompts."""
    nll, tokens, mc_var = 0.0, 0, 0.0
    mb = cfg.train.micro_batch_size
    for i, x0 in enumerate(val_batches):  # keys give each held-out sample the same noise in any layout
        key = BatchKey(VAL_SEED, i, dims.dp_rank, dims.dp, mb * dims.dp * len(val_batches))
        terms = engine.eval_terms(x0, cfg.train.val_time_samples, key)
        nll += float(terms.nll.sum())
        tokens += int(terms.tokens.sum())
        mc_var += float(terms.mc_var.sum())
    nll, tokens, mc_var = engine.all_reduce_dp([nll, tokens, mc_var])  # sums over data-parallel ranks
    nelbo = nll / max(tokens, 1)
    # Standard error of the masks' Monte-Carlo noise given these validation tokens (not of the data sampling).
    # Each sequence's draws are stratified, yet their spread is taken as if independent: a conservative figure.
    se = math.sqrt(mc_var) / max(tokens, 1)
    return {"val_nelbo": round(nelbo, 5), "val_nelbo_se": round(se, 6), "val_ppl_bound": round(perplexity(nelbo), 3),
            "val_unigram_entropy": round(unigram_entropy(scored_tokens(val_batches), pad_id), 5),
            "val_tokens": int(tokens)}


def scored_tokens(batches: list) -> list[torch.Tensor]:
    """The tokens validation scores: each batch whole, or an SFT batch's responses (prompts are never scored)."""
    return [b if isinstance(b, torch.Tensor) else b[0][~b[1]] for b in batches]


def validate_with(ema, engine, val_batches: list, cfg: Config, dims: ParallelDims, pad_id: int) -> dict:
    """`validate` on the EMA weights when the run keeps an EMA (`ema` not None), else on the raw weights; the row
    says which."""
    if ema is None:
        return {**validate(engine, val_batches, cfg, dims, pad_id), "val_weights": "raw"}
    with ema.applied():
        return {**validate(engine, val_batches, cfg, dims, pad_id), "val_weights": "ema"}
