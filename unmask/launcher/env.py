"""Who am I in the job: rank, world size, local rank and rendezvous address, from torchrun or SLURM.

Three ways a process can be started:
- torchrun (also torchrun under `srun`, one agent per node): torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT itself; nothing to do.
- `srun` starting one task per GPU, no torchrun: the same facts come from SLURM_* variables and
  `export_torch_env()` writes them as the RANK/WORLD_SIZE/... variables torch's env:// init reads.
  Only an srun step counts (SLURM_STEP_NUM_TASKS is set): the batch script itself has SLURM_PROCID=0 and
  SLURM_NTASKS=N but is one process, and treating it as rank 0 of N would wait forever for the others.
- anything else: one process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal

from unmask.errors import UnmaskError

# Training exits with this code after saving its state on SIGUSR1 (SLURM's warning before the time limit);
# the sbatch script requeues the job when it sees it. 3: distinct from Python's 1 and argparse/CLI's 2.
REQUEUE_EXIT_CODE = 3
DEFAULT_PORT = 29500

Source = Literal["torchrun", "slurm", "env", "single"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: Source = "single"  # env: RANK/WORLD_SIZE set by hand or another launcher

    def torch_vars(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; raises UnmaskError naming the variable when one is malformed."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env:
        return _from_torch_vars(env, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return _from_slurm(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torch_vars(env, "env")
    return DistEnv(master_port=_int(env, "MASTER_PORT", DEFAULT_PORT))


def export_torch_env(environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """Make torch's env:// init work under plain srun: write RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT from SLURM_*. A no-op under torchrun or for one process; idempotent
    (variables already set are kept, so a user's MASTER_ADDR/MASTER_PORT win)."""
    env = os.environ if environ is None else environ
    dist = discover(env)
    if dist.source == "slurm":
        for key, value in dist.torch_vars().items():
            env.setdefault(key, value)
    return dist


def _from_torch_vars(env: Mapping[str, str], source: Source) -> DistEnv:
    world = _int(env, "WORLD_SIZE", 1)
    return DistEnv(rank=_int(env, "RANK", 0), world_size=world, local_rank=_int(env, "LOCAL_RANK", 0),
                   local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
                   master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=_int(env, "MASTER_PORT", DEFAULT_PORT), source=source)


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UnmaskError("SLURM_PROCID is set but SLURM_STEP_NODELIST/SLURM_JOB_NODELIST are not: "
                          "start training with srun inside the allocation")
    per_node = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1"))
    node = _int(env, "SLURM_NODEID", 0)
    return DistEnv(rank=_int(env, "SLURM_PROCID", 0), world_size=_int(env, "SLURM_STEP_NUM_TASKS", 1),
                   local_rank=_int(env, "SLURM_LOCALID", 0),
                   local_world_size=per_node[node] if node < len(per_node) else per_node[-1],
                   master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
                   master_port=_int(env, "MASTER_PORT", slurm_port(env.get("SLURM_JOB_ID"))), source="slurm")


def slurm_port(job_id: str | None) -> int:
    """A rendezvous port derived from the job id, so two jobs sharing a node do not collide."""
    return 20000 + int(job_id) % 20000 if job_id and job_id.isdigit() else DEFAULT_PORT


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UnmaskError(f"environment variable {key}={raw!r} is not an integer") from None


# ------------------------------------------------------------------------------------- SLURM list syntax

_HOST = re.compile(r"\[([^\[\]]*)\]")


def expand_nodelist(nodelist: str) -> list[str]:
    """`node[01-03,07],gpu-a[1-2]` -> node01 node02 node03 node07 gpu-a1 gpu-a2, as `scontrol show hostnames`.

    Commas separate hosts except inside brackets; a bracket holds numbers and ranges whose zero padding
    follows the lower bound; several brackets in one name expand to every combination (`r[1-2]n[1-2]`)."""
    hosts: list[str] = []
    for expr in _split_top_level(nodelist.strip(), nodelist):
        parts = _HOST.split(expr)  # literal, bracket, literal, bracket, ..., literal
        if "[" in "".join(parts[0::2]) or "]" in "".join(parts[0::2]):
            raise UnmaskError(f"node list {nodelist!r}: unbalanced brackets in {expr!r}")
        names = [parts[0]]
        for bracket, literal in zip(parts[1::2], parts[2::2], strict=True):
            names = [n + value + literal for n in names for value in _expand_bracket(bracket, nodelist)]
        hosts.extend(names)
    return hosts


def _split_top_level(text: str, original: str) -> list[str]:
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise UnmaskError(f"node list {original!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    if depth or any(not p for p in out):
        raise UnmaskError(f"node list {original!r}: empty host name or unbalanced brackets")
    return out


def _expand_bracket(body: str, original: str) -> list[str]:
    values: list[str] = []
    for item in body.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise UnmaskError(f"node list {original!r}: {item!r} is not a number or a range like 01-04")
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise UnmaskError(f"node list {original!r}: range {item!r} runs backwards")
        values.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return values


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE: `2(x3),1` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise UnmaskError(f"SLURM tasks-per-node {spec!r}: {item!r} is not N or N(xM)")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out
