"""The torchrun command and the sbatch script for a training run, built from a few facts about the job."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from unmask.errors import UnmaskError
from unmask.launcher.env import REQUEUE_EXIT_CODE


@dataclass
class Job:
    config: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    procs_per_node: int = 1  # GPUs per node: one training process each
    rdzv_endpoint: str | None = None  # HOST:PORT of the c10d store; required past one node outside SLURM
    rdzv_id: str | None = None

    @property
    def name(self) -> str:
        return f"unmask-{Path(self.config).stem}"

    def train_args(self) -> list[str]:
        return ["unmask", "train", self.config, *self.overrides]


@dataclass
class Slurm:
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: the budget for a checkpoint save
    launcher: Literal["torchrun", "srun"] = "torchrun"  # srun: one task per GPU, ranks from SLURM_*
    gpus: bool = True  # False on CPU clusters: request tasks only, no GPUs
    cpus_per_task: int | None = None  # default: cpus_per_gpu per training process of the task
    cpus_per_gpu: int = 8  # cores per training process (its loader workers and threads share them)
    env: dict[str, str] = field(default_factory=dict)  # exported before srun (launch.env); the job's own wins
    output: str = "%x-%j.out"
    workdir: str = field(default_factory=lambda: str(Path.cwd()))
    python: str = sys.executable
    extra: list[str] = field(default_factory=list)  # further sbatch options, e.g. --qos=high


def torchrun_args(job: Job) -> list[str]:
    """torchrun's arguments (without `torchrun`) for one node's agent, c10d rendezvous."""
    endpoint = job.rdzv_endpoint
    if endpoint is None:
        if job.nodes > 1:
            raise UnmaskError(f"--nodes {job.nodes} needs --rdzv-endpoint HOST:PORT: an address of one of the "
                              "nodes that every node can reach (the c10d store runs there)")
        endpoint = "127.0.0.1:0"  # one node: any free port
    elif not re.fullmatch(r"[^\s:]+:\d+", endpoint):
        raise UnmaskError(f"--rdzv-endpoint {endpoint!r} is not HOST:PORT")
    return ["--nnodes", str(job.nodes), "--nproc_per_node", str(job.procs_per_node), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", endpoint, "--rdzv_id", job.rdzv_id or job.name, "-m", *job.train_args()]


def torchrun_command(job: Job) -> list[str]:
    return ["torchrun", *torchrun_args(job)]


def render_sbatch(job: Job, slurm: Slurm, entry: list[str] | None = None) -> str:
    """The sbatch script: srun starts one torchrun agent per node (or one training task per GPU with
    launcher="srun"). `entry` replaces `-m unmask train CONFIG ...` (tests run a probe program with it)."""
    limit = slurm_time_seconds(slurm.time)
    # slurmctld checks every 30 s and may signal up to 60 s early: closer than that, the warning can
    # arrive while the job is still starting
    if not 0 < slurm.signal_seconds <= min(limit - 60, 65535):
        raise UnmaskError(f"--signal-seconds {slurm.signal_seconds} must be positive, at most 65535 and at least "
                          f"60 s shorter than --time {slurm.time} ({limit} s)")
    entry = entry or ["-m", *job.train_args()]
    per_node = job.procs_per_node if slurm.launcher == "srun" else 1
    if slurm.launcher == "srun":
        command = [slurm.python, *entry]
        path = "The tasks are the training processes."
    else:
        agent = ["--nnodes", str(job.nodes), "--nproc_per_node", str(job.procs_per_node), "--rdzv_backend", "c10d"]
        command = [slurm.python, "-m", "unmask.launcher.agent", *agent, *entry]
        path = "That includes the workers of each torchrun agent."
    directives = [f"--job-name={slurm.job_name or job.name}", f"--nodes={job.nodes}",
                  f"--ntasks-per-node={per_node}"]
    directives += [f"--gpus-per-node={job.procs_per_node}"] if slurm.gpus else []
    # Under cgroups a task gets only the cores it asks for: the torchrun task holds every rank of its node.
    procs_per_task = job.procs_per_node if slurm.launcher == "torchrun" else 1
    directives += [f"--cpus-per-task={slurm.cpus_per_task or slurm.cpus_per_gpu * procs_per_task}"]
    directives += [f"--time={slurm.time}"]
    directives += [f"--partition={slurm.partition}"] if slurm.partition else []
    directives += [f"--account={slurm.account}"] if slurm.account else []
    directives += [f"--chdir={slurm.workdir}", f"--output={slurm.output}", "--open-mode=append", "--requeue",
                   f"--signal=USR1@{slurm.signal_seconds}", *slurm.extra]
    values = {"title": f"{job.nodes} node(s) x {job.procs_per_node} process(es): {shlex.join(job.train_args())}",
              "directives": "\n".join(f"#SBATCH {d}" for d in directives),
              "signal_seconds": str(slurm.signal_seconds), "signal_path": path,
              "requeue_code": str(REQUEUE_EXIT_CODE), "srun_command": shlex.join(command),
              "exports": "\n".join(f'export {k}="${{{k}:-{v}}}"' for k, v in slurm.env.items())}
    return fill(resources.files("unmask.launcher").joinpath("templates/sbatch.sh").read_text(), values)


def fill(template: str, values: dict[str, str]) -> str:
    """Replace {{name}} (bash keeps its own $ and ${...})."""
    missing = set(re.findall(r"\{\{(\w+)\}\}", template)) - set(values)
    if missing:
        raise KeyError(f"template needs values for {sorted(missing)}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def slurm_time_seconds(text: str) -> int:
    """SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise UnmaskError(f"--time {text!r} is not a SLURM time such as 04:00:00 or 1-12:00:00")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)
