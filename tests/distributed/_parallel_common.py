"""Shared by the distributed worker scripts and their tests: a tiny config, synthetic global batches, a
training run through the real engines. Synthetic data keeps these tests independent of the data pipeline."""

from __future__ import annotations

import json
import os
import sys

import torch

from unmask.config import Config
from unmask.data.special import SpecialTokens
from unmask.diffusion.noise import BatchKey

SPECIAL = SpecialTokens()
MASK_ID, PAD_ID = SPECIAL.mask, SPECIAL.pad


def make_cfg(**sections) -> Config:
    """The `tiny` model, short sequences; `sections` are {"parallel": {...}, "train": {...}} overrides."""
    data = {"model": {"size": "tiny"},
            "train": {"seq_len": 32, "micro_batch_size": 2, "grad_accum": 2, "steps": 10, "seed": 0},
            "optim": {"lr": 3e-3, "warmup_steps": 2, "grad_clip": 1.0}}
    for name, fields in sections.items():
        data.setdefault(name, {}).update(fields)
    return Config.model_validate(data)


def global_batch(cfg: Config, step: int, dp: int) -> torch.Tensor:
    """All samples of one step over every dp rank and micro-batch: [mb * accum * dp, L], no pad tokens."""
    n = cfg.train.micro_batch_size * cfg.train.grad_accum * dp
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(5, cfg.model.vocab_size, (n, cfg.train.seq_len), generator=g)


def sft_samples(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT samples made of random tokens (for runs with diffusion.prompt_conditioned): `<bos> prompt answer <eos> ...`
    with prompt and answer lengths varying per sample, and the prompt mask (True on <bos> and the prompt)."""
    n, L = x.shape
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(2, L // 2, (n, 1), generator=g)  # with <bos>
    answer_end = prompt_len + torch.randint(1, L // 3, (n, 1), generator=g)
    pos = torch.arange(L)[None]
    tokens = torch.where(pos >= answer_end, SPECIAL.eos, torch.where(pos == 0, SPECIAL.bos, x))
    return tokens, pos < prompt_len


def rank_batches(cfg: Config, step: int, dp: int, dp_rank: int) -> tuple[list, list[BatchKey]]:
    """This dp rank's micro-batches of a step: sample k of micro m is global sample (m * dp + dp_rank) * mb + k,
    the loader's layout, so BatchKey noise lines up with any other layout of the same global batch. With
    diffusion.prompt_conditioned a micro-batch is an SFT split's (tokens, prompt_mask)."""
    mb, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    x = global_batch(cfg, step, dp)
    sft = sft_samples(x, step) if cfg.diffusion.prompt_conditioned else None
    micro, keys = [], []
    for m in range(accum):
        idx = (m * dp + dp_rank) * mb + torch.arange(mb)
        micro.append(x[idx] if sft is None else (sft[0][idx], sft[1][idx]))
        keys.append(BatchKey(step, m, dp_rank, dp, mb * accum * dp))
    return micro, keys


def train(cfg: Config, steps: int, eval_split: int | None = None, ema_dir=None) -> dict:
    """Run `steps` optimizer steps through setup_parallel + build_components, as the train loop does, then the
    validation terms of a held-out batch summed over dp ranks. Validation masks depend on the per-rank batch
    shape, so a one-process reference evaluates the same per-rank slices (`eval_split` = the other run's dp).
    With train.ema_decay > 0 the weight EMA is kept as the loop keeps it: "ema_eval" is the validation on it,
    "eval_after" the one on the raw weights after it, "ema" the EMA, and every rank writes its EMA file under
    `ema_dir` if given."""
    from unmask.engines import build_components
    from unmask.parallel.dims import setup_parallel
    from unmask.train.ema import EMA

    dims = setup_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    engine = build_components(cfg, dims, torch.device("cpu"), SPECIAL).engine
    ema = EMA(engine.local_weights, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    losses, norms = [], []
    for step in range(steps):
        micro, keys = rank_batches(cfg, step, dims.dp, dims.dp_rank)
        stats = engine.train_step(micro, keys)
        if ema and not stats.skipped:
            ema.update()
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
    out = {"loss": losses, "grad_norm": norms, "eval": evaluate(engine, cfg, dims, eval_split), "dims": dims,
           "engine": engine}
    if ema:
        with ema.applied():
            out["ema_eval"] = evaluate(engine, cfg, dims, eval_split)
        out["eval_after"] = evaluate(engine, cfg, dims, eval_split)
        out["ema"] = ema.shadow
        if ema_dir is not None:
            ema.save(ema_dir)
    return out


def evaluate(engine, cfg: Config, dims, eval_split: int | None) -> list[float]:
    split = eval_split or dims.dp
    x0 = torch.randint(5, cfg.model.vocab_size, (8, cfg.train.seq_len), generator=torch.Generator().manual_seed(7))
    prompt = sft_samples(x0, 7) if cfg.diffusion.prompt_conditioned else None
    ranks = [dims.dp_rank] if split == dims.dp else range(split)
    terms = [0.0, 0.0]
    for r in ranks:  # held-out rows strided like the loader
        batch = x0[r::split] if prompt is None else (prompt[0][r::split], prompt[1][r::split])
        got = engine.eval_terms(batch, 2, 123)
        per_seq, counts = got.nll, got.tokens
        terms = [terms[0] + float(per_seq.sum()), terms[1] + float(counts.sum())]
    return engine.all_reduce_dp(terms)


def write_result(result: dict) -> None:
    """Rank 0 writes the JSON result to the path given as the script's first argument; then every rank ends its
    process groups together (a rank leaving with a live gloo group can abort at exit)."""
    from unmask.parallel.dims import teardown_parallel

    if int(os.environ.get("RANK", 0)) == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    teardown_parallel()


def launch(script: str, nproc: int, out_dir, *args: str, timeout: int = 900) -> dict:  # timeout: a hang guard
    """Run `torchrun --standalone --nproc_per_node=nproc script OUT args...` (gloo, one thread per process)
    and return the JSON that rank 0 wrote."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).parent
    out = Path(out_dir) / f"{Path(script).stem}-{nproc}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a launcher's variables from an outer job would confuse torchrun's children
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(here / script), str(out), *args]
    proc = subprocess.run(cmd, env=env, cwd=here.parent.parent, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


def reference(steps: int, global_micro: int, dp: int, **sections) -> dict:
    """One local process seeing the same global batch: micro-batches of dp * micro_batch_size samples."""
    train_section = {"micro_batch_size": global_micro, **sections.pop("train", {})}
    out = train(make_cfg(train=train_section, **sections), steps, eval_split=dp)
    return {k: out[k] for k in ("loss", "grad_norm", "eval", "ema_eval", "eval_after", "ema") if k in out}


def check_ema(got: dict, ref: dict, folder, cfg: Config, rel: float = 1e-5) -> None:
    """A run's weight EMA against the one-process reference's: the EMA-swapped validation agrees (and is far
    enough from the raw weights' for a wrong swap to show), the raw weights come back exactly, and the EMA
    consolidated from the per-rank files under `folder` equals the reference's."""
    import pytest

    from unmask.checkpoint.ema_weights import ema_state

    assert got["ema_eval"] == pytest.approx(ref["ema_eval"], rel=rel)
    assert abs(got["ema_eval"][0] - got["eval"][0]) > 1e-4 * abs(got["eval"][0])
    assert got["eval_after"] == got["eval"]
    full = ema_state(folder, cfg)
    assert full.keys() == ref["ema"].keys()
    for k, v in ref["ema"].items():
        torch.testing.assert_close(full[k], v, rtol=1e-4, atol=1e-5, msg=k)


def run_spec(runs: list[dict]) -> str:
    return json.dumps({"runs": runs})
