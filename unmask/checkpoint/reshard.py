"""Resuming with another data-parallel size (or ZeRO stage 1 <-> 2): the engine state through DeepSpeed's universal
checkpoint, the data loader re-partitioned from the saved global position.

Engine. ZeRO-1/2 keep the fp32 weights and Adam moments as flat partitions whose cut depends on the dp size.
Rank 0 converts the saved partitions with DeepSpeed's `ds_to_universal` into one folder per parameter
(fp32 weights, exp_avg, exp_avg_sq, step) under `checkpoints/.reshard-step-…` and every rank loads its new
partition from it (`load_universal`); the folder is deleted afterwards. Values are copied, never recomputed, so
the resumed run starts from bit-identical weights, moments, step counts and LR schedule. ZeRO-0 keeps the whole
optimizer on every rank: DeepSpeed loads it under any dp size as is. Refused with one line: tensor/pipeline
degree changes (`check_compatible`), a dp change with tp or pp > 1 (universal checkpoints of megatron-core shards
would need their split patterns), ZeRO-3 on either side (DeepSpeed 0.19's universal load expects ZeRO-3 files
the conversion does not write), switching between ZeRO-0 and 1-2, and the local engine (one process, engine.pt).

Loader. Every rank saved the same global position P (synchronous data parallelism consumes equally; a
checkpoint whose ranks disagree is refused). Each new rank restores P and takes its share of the positions from P
on under the new layout, so within the epoch the samples below P were each consumed once before the change and
those from P on are consumed once after it: none is repeated or skipped (see unmask/data/loader.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

import torch

from unmask.config import Config
from unmask.errors import CheckpointError
from unmask.parallel import collective

WRAPPED = "_checkpoint_wrapped_module."  # activation checkpointing's prefix in parameter names


def client_state(path: Path, saved_world: int, rank: int) -> dict:
    """This rank's client state under the new layout: the common loader position, its own RNG state where the
    saved run had this rank (else rank 0's; noise draws do not use it, see unmask/diffusion/noise.py)."""
    clients = [torch.load(path / "client" / f"rank-{r:05d}.pt", weights_only=True) for r in range(saved_world)]
    positions = sorted({c["loader"]["position"] for c in clients})
    if len(positions) != 1:
        raise CheckpointError(f"{path}: the ranks saved different loader positions {positions}, so the consumed "
                              "samples are not one prefix of the epoch; resume with the same number of processes")
    loader = dict(clients[0]["loader"])
    loader["skipped_shards"] = sorted({s for c in clients for s in c["loader"].get("skipped_shards", [])})
    return {**clients[rank % saved_world], "loader": loader}


def check_supported(path: Path, saved: Config, current: Config) -> None:
    """Refuse, in one line, the layout changes this module cannot carry over exactly."""
    for cfg, when in ((saved, "was saved"), (current, "resumes")):
        p = cfg.parallel
        if p.engine != "deepspeed":
            raise CheckpointError(f"{path}: resuming with another number of processes, engine or ZeRO stage needs "
                                  f"parallel.engine=\"deepspeed\" before and after, but the run {when} with the local "
                                  "engine; resume with the saved layout")
        if p.tp != 1 or p.pp != 1:
            raise CheckpointError(f"{path}: changing the data-parallel size needs parallel.tp=1 and parallel.pp=1 "
                                  f"(the run {when} with tp={p.tp}, pp={p.pp}); resume with the saved world size")
        if p.zero_stage == 3:
            raise CheckpointError(f"{path}: the run {when} with parallel.zero_stage=3, whose universal-checkpoint "
                                  "load fails in DeepSpeed 0.19; change the data-parallel size under ZeRO 0-2, or "
                                  "resume with the saved world size and stage")
    a, b = saved.parallel.zero_stage, current.parallel.zero_stage
    if saved.lora.rank and a:  # the universal conversion carries optimizer partitions, not the frozen base weights
        raise CheckpointError(f"{path}: a LoRA run (lora.rank={saved.lora.rank}) saved with parallel.zero_stage={a} "
                              "resumes only with the saved number of processes (its frozen base is not in the ZeRO "
                              "partitions the conversion reads); resume with the saved world size")
    if (a == 0) != (b == 0):
        raise CheckpointError(f"{path} was saved with parallel.zero_stage={a} and this run has {b}: a layout change "
                              "cannot also switch between ZeRO-0 and ZeRO 1-2; keep the saved zero_stage")


def load_engine(path: Path, engine, saved: Config, current: Config, rank: int) -> None:
    """Load a checkpoint written under another dp size (or ZeRO stage) into `engine` (every rank calls this)."""
    check_supported(path, saved, current)
    if saved.parallel.zero_stage == 0:  # the full optimizer state is in the model-states file: layout-free
        engine.load(str(path), "engine")
        return
    tmp = path.parent / f".reshard-{path.name}"
    problem = None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            to_universal(path / "engine", tmp / "engine", [n for n, _ in engine.ds.module.named_parameters()])
        except Exception as e:  # noqa: BLE001 - report DeepSpeed's failure on every rank, not a hang
            problem = f"{type(e).__name__}: {e}"
    problem = collective.broadcast_object(problem)
    if problem:
        raise CheckpointError(f"{path}: DeepSpeed could not convert the ZeRO partitions to a universal "
                              f"checkpoint ({problem})")
    try:
        with universal_loading(engine.ds):
            engine.ds.load_checkpoint(str(tmp), tag="engine")
    finally:
        collective.barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def to_universal(src: Path, dst: Path, names: list[str]) -> None:
    """DeepSpeed's ds_to_universal (in process, serially), then parameter folders renamed to `names` (the loading
    engine's parameter names, which differ when only one side uses activation checkpointing)."""
    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(args)  # it prints every stage and tqdm bars
    zero = dst / "zero"
    found = {p.name.replace(WRAPPED, ""): p for p in zero.iterdir() if p.is_dir()}
    for name in names:
        folder = found.get(name.replace(WRAPPED, ""))
        if folder is not None and folder.name != name:
            folder.rename(zero / name)

@contextlib.contextmanager
def universal_loading(ds):
    """DeepSpeed reads `checkpoint.load_universal` from its config at load time; the engine was built before the
    checkpoint was chosen, so the flag is set for this one load."""
    before = ds._config.load_universal_checkpoint
    ds._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        ds._config.load_universal_checkpoint = before
