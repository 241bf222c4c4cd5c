"""Checkpoints that survive anything: atomic, verified by a manifest, pruned, resumed exactly.

Layout under `<run_dir>/checkpoints/`:
    step-00000500/engine/...            the engine's own files (DeepSpeed shards per ZeRO/TP/PP rank, or one .pt)
    step-00000500/client/rank-00000.pt  per-rank client state: data loader position, RNG states
    step-00000500/ema/tp00-pp00-dp00000.pt  EMA of the weights, a file per piece (train.ema_decay > 0 only)
    step-00000500/meta.json             step, tokens, resolved config and its hash, tracking run id, layout
    step-00000500/manifest.json         size and sha256 of every file above; written last inside the folder
    latest                              name of the newest complete checkpoint; written after the rename

A checkpoint is written into `.tmp-step-…` and renamed only when complete, so a kill -9 at any moment leaves
either the previous checkpoints untouched or a `.tmp-` folder that nothing reads (and the next run deletes).
Every file is fsynced before the manifest is written, the folder after the rename. On resume every candidate is
verified against its manifest, each rank hashing a stripe of its files; a truncated or corrupted one is skipped
with a warning in favour of the one before. A save that fails on any rank (full disk) fails on every rank with one
CheckpointError, after the `.tmp-` folder is removed. Client state is loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from unmask import faults
from unmask.config import CheckpointConfig, Config
from unmask.errors import CheckpointError
from unmask.parallel import collective

STEP_DIR = re.compile(r"^step-(\d{8})$")
# Keys whose change alters tensor shapes or the meaning of the saved state: refused on resume.
# lora: the engine state holds adapters of that rank on those modules, scaled by alpha
SHAPE_KEYS = ["model", "diffusion.objective", "train.seq_len", "parallel.tp", "parallel.pp", "lora.rank", "lora.alpha",
              "lora.target_modules"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a file's own fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_and_sync(path: Path) -> dict:
    """Size and sha256 of a written file, after fsync: the manifest must never describe bytes still in cache."""
    with path.open("rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def verify(path: Path, rank: int = 0, world: int = 1) -> str | None:
    """None if the checkpoint folder matches its manifest, else what is wrong. With `world` > 1 only this rank's
    stripe of the files is hashed (`verify_all` combines the stripes)."""
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as e:
        return f"manifest.json is not valid JSON ({e})"
    for rel in sorted(manifest["files"])[rank::world]:
        entry, f = manifest["files"][rel], path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {entry['size']}"
        if sha256(f) != entry["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def verify_all(path: Path, rank: int, world: int) -> str | None:
    """`verify` with the hashing split over every rank (all must call it); the same answer on every rank."""
    problems = collective.gather_objects(verify(path, rank, world))
    return next((p for p in problems if p), None)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(cfg.to_toml().encode()).hexdigest()[:16]


def check_compatible(saved: Config, current: Config, path: Path) -> None:
    """Refuse resuming with a different shape; lr, steps, intervals and the like may change."""
    old, new = saved.model_dump(), current.model_dump()
    for key in SHAPE_KEYS:
        section, _, field = key.partition(".")
        a = old[section] if not field else old[section][field]
        b = new[section] if not field else new[section][field]
        if section == "model":  # name the first differing model field
            diff = [k for k in a if a[k] != b[k] and k != "size"]
            if diff:
                k = diff[0]
                raise CheckpointError(
                    f"{path} was trained with model.{k}={a[k]!r} but this run has model.{k}={b[k]!r}: shapes cannot "
                    "change on resume (use a new train.run_dir, or --resume never)")
        elif a != b:
            raise CheckpointError(f"{path} was trained with {key}={a!r} but this run has {key}={b!r}: it cannot "
                                  "change on resume (use a new train.run_dir, or --resume never)")


class Checkpointer:
    def __init__(self, run_dir: Path, cfg: CheckpointConfig, rank: int = 0, world: int = 1):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg, self.rank, self.world = cfg, rank, world
        self.last_save = time.monotonic()

    # ------------------------------------------------------------------------------------------- saving

    def due(self, step: int) -> bool:
        by_steps = self.cfg.interval_steps > 0 and step % self.cfg.interval_steps == 0
        by_time = self.cfg.interval_minutes > 0 and time.monotonic() - self.last_save >= 60 * self.cfg.interval_minutes
        return collective.any_rank(by_steps or by_time)  # clocks differ across ranks: agree

    def save(self, step: int, engine, meta: dict, client: dict, ema=None) -> Path:
        """Every rank calls this; returns the final folder. If writing fails on any rank (a full disk), every
        rank raises the same CheckpointError, the `.tmp-` folder is removed and older checkpoints stay valid.
        `ema` (unmask.train.ema.EMA): its per-rank file goes in with the rest, under the same manifest."""
        final, tmp = self.root / f"step-{step:08d}", self.root / f".tmp-step-{step:08d}"

        def prepare():
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "client").mkdir(parents=True)

        self._agree(step, tmp, prepare)

        def write():
            engine.save(str(tmp), "engine")
            torch.save(client, tmp / "client" / f"rank-{self.rank:05d}.pt")
            if ema is not None:
                ema.save(tmp)

        self._agree(step, tmp, write)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        # Each rank fsyncs and hashes a stripe of the files (large sharded checkpoints hash in parallel).
        parts = self._agree(step, tmp, lambda: {rel: hash_and_sync(tmp / rel) for rel in files[self.rank::self.world]})

        def publish():
            if self.rank != 0:
                return
            write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
            entries = {k: v for part in parts for k, v in part.items()}
            entries["meta.json"] = hash_and_sync(tmp / "meta.json")
            write_atomic(tmp / "manifest.json", json.dumps({"step": step, "files": entries}, indent=1))
            faults.hit("save.written", step)  # tests: a kill here leaves a whole-looking .tmp- folder
            if final.exists():  # the same step saved again (after a rollback): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            write_atomic(self.root / "latest", final.name + "\n")
            self._prune(keep=final)

        self._agree(step, tmp, publish)
        self.last_save = time.monotonic()
        return final

    def _agree(self, step: int, tmp: Path, work):
        """Run `work` on every rank, then agree on success with a small collective, so that one rank's failure
        (ENOSPC, EFBIG, EIO) reaches every rank instead of leaving them at a barrier. Returns every rank's result
        in rank order."""
        result, error = None, None
        try:
            result = work()
        except OSError as e:
            error = f"rank {self.rank}: {e.strerror or e} ({e.filename or tmp})"
        except Exception as e:  # torch.save reports a full disk as RuntimeError; any failure must reach every rank
            error = f"rank {self.rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        outcomes = collective.gather_objects((result, error))
        errors = [e for _, e in outcomes if e]
        if errors:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            collective.barrier()
            latest = self.root / "latest"
            kept = latest.read_text().strip() if latest.is_file() else "none"
            raise CheckpointError(f"saving checkpoint step {step} into {tmp} failed on {errors[0]}; removed the "
                                  f"partial folder, older checkpoints in {self.root} are intact (latest: {kept}); "
                                  "free space on that file system or point train.run_dir elsewhere")
        return [r for r, _ in outcomes]

    def _prune(self, keep: Path) -> None:
        steps = sorted(self._complete_steps(), reverse=True)
        recent = set(steps[: self.cfg.keep_last])
        for step in steps:
            every = self.cfg.keep_every and step % self.cfg.keep_every == 0
            path = self.root / f"step-{step:08d}"
            if step not in recent and not every and path != keep:
                shutil.rmtree(path, ignore_errors=True)

    def _complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return [int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name))]

    # ------------------------------------------------------------------------------------------ resuming

    def find(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `never`, an explicit path (must be valid), or `auto` = the newest
        valid one. Every rank calls this: the ranks hash stripes of each candidate's files and agree."""
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            problem = verify_all(path, self.rank, self.world)
            if problem:
                problem = problem if path.is_dir() else "no such checkpoint folder"
                raise CheckpointError(f"cannot resume from {path}: {problem}")
            return path
        steps = None
        if self.rank == 0:
            for tmp in self.root.glob(".tmp-step-*") if self.root.is_dir() else []:
                shutil.rmtree(tmp, ignore_errors=True)  # an interrupted save: never complete, never read
            steps = sorted(self._complete_steps(), reverse=True)
        for step in collective.broadcast_object(steps):
            path = self.root / f"step-{step:08d}"
            problem = verify_all(path, self.rank, self.world)
            if problem is None:
                return path
            if self.rank == 0:
                warnings.warn(f"checkpoint {path} is unusable ({problem}); falling back to the previous one",
                              stacklevel=2)
        return None

    def load(self, path: Path, engine, cfg: Config, ema=None) -> tuple[dict, dict]:
        """Restore the engine (and `ema`, after it: an EMA missing from the checkpoint starts from the restored
        weights); return (meta, this rank's client state). A checkpoint written by another number of processes (a
        data-parallel change) or another ZeRO stage is re-partitioned (unmask/checkpoint/reshard.py)."""
        from unmask.config import load_config_text

        meta = json.loads((path / "meta.json").read_text())
        saved = load_config_text(meta["config"], where=str(path / "meta.json"))
        check_compatible(saved, cfg, path)
        saved_world = meta["layout"]["world"]
        same_layout = saved_world == self.world and (saved.parallel.engine, saved.parallel.zero_stage) == (
            cfg.parallel.engine, cfg.parallel.zero_stage)
        if same_layout:
            engine.load(str(path), "engine")
            client = torch.load(path / "client" / f"rank-{self.rank:05d}.pt", weights_only=True)
        else:
            from unmask.checkpoint import reshard

            reshard.load_engine(path, engine, saved, cfg, self.rank)
            client = reshard.client_state(path, saved_world, self.rank)
        if ema is not None:
            ema.load(path)
        return meta, client
