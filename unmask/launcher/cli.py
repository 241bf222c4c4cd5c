"""`unmask launch CONFIG [--section.key=value ...] --nodes N --gpus-per-node G`.

Prints the torchrun command to run on every node (c10d rendezvous), or runs it on this node (--run).
With --slurm it renders the sbatch script instead (printed, written with --out, submitted with --run).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from unmask.errors import UnmaskError

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML config; training overrides follow as --section.key=value")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="training processes per node, one per GPU")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous store (required past one node)")
    p.add_argument("--rdzv-id", help="rendezvous id shared by all nodes (default unmask-<config name>)")
    p.add_argument("--run", action="store_true", help="run torchrun on this node (with --slurm: sbatch the script)")
    s = p.add_argument_group("SLURM (--slurm)")
    s.add_argument("--slurm", action="store_true", help="render the sbatch script (srun + torchrun, requeue)")
    s.add_argument("--launcher", choices=["torchrun", "srun"], default="torchrun",
                   help="torchrun: one agent per node (default); srun: one task per GPU, ranks from SLURM_*")
    s.add_argument("--time", default="24:00:00", help="time limit, e.g. 04:00:00 or 1-12:00:00")
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--account", help="SLURM account")
    s.add_argument("--job-name", help="job name (default unmask-<config name>)")
    s.add_argument("--signal-seconds", type=int, default=300,
                   help="send SIGUSR1 this many seconds before the time limit, to save and requeue (default 300)")
    s.add_argument("--cpus-per-task", type=int,
                   help="CPUs per SLURM task (default: --cpus-per-gpu x the training processes of the task)")
    s.add_argument("--cpus-per-gpu", type=int, default=8,
                   help="cores per training process, for its threads and data.num_workers loader workers (default 8)")
    s.add_argument("--cpu-only", action="store_true", help="CPU cluster: request no GPUs")
    s.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="extra sbatch option, e.g. --sbatch-option=--qos=high (repeatable)")
    s.add_argument("--log", default="%x-%j.out", help="job output file (default %%x-%%j.out: <job name>-<job id>.out)")
    s.add_argument("--out", help="write the script to this file instead of printing it")


def run(args: argparse.Namespace) -> int:
    from unmask.launcher.commands import Job, Slurm, render_sbatch, torchrun_args, torchrun_command

    job = Job(args.config, list(args.overrides), args.nodes, args.gpus_per_node, args.rdzv_endpoint, args.rdzv_id)
    cfg = check(job)
    if not args.slurm:
        if not args.run:
            print(shlex.join(torchrun_command(job)))
            return 0
        sys.stdout.flush()
        # torchrun is `python -m torch.distributed.run`; this form needs no torchrun on PATH
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *torchrun_args(job)])
    slurm = Slurm(time=args.time, partition=args.partition, account=args.account, job_name=args.job_name,
                  signal_seconds=args.signal_seconds, launcher=args.launcher, gpus=not args.cpu_only,
                  cpus_per_task=args.cpus_per_task, cpus_per_gpu=args.cpus_per_gpu, env=cfg.launch.env_vars,
                  output=args.log, extra=args.sbatch_option)
    per_rank = (args.cpus_per_task // (args.gpus_per_node if args.launcher == "torchrun" else 1)
                if args.cpus_per_task else args.cpus_per_gpu)
    if cfg.data.num_workers >= per_rank:
        raise UnmaskError(f"data.num_workers={cfg.data.num_workers} loader workers per rank do not fit the {per_rank} "
                          f"core(s) per rank this job asks for; set data.num_workers <= {max(per_rank - 1, 0)} or "
                          "raise --cpus-per-gpu")
    script = render_sbatch(job, slurm)
    if not args.out and not args.run:
        print(script, end="")
        return 0
    path = Path(args.out or f"{args.job_name or job.name}.sbatch")
    path.write_text(script)
    print(f"unmask launch: wrote {path}", file=sys.stderr)
    if args.run:
        try:
            return subprocess.run(["sbatch", str(path)]).returncode
        except FileNotFoundError:
            raise UnmaskError(f"sbatch is not on PATH: submit {path} from a SLURM login node") from None
    return 0


def check(job):
    """Fail here, not on the cluster: the config must load and the layout must fit nodes x GPUs."""
    from unmask.config import load_config

    if job.nodes < 1 or job.procs_per_node < 1:
        raise UnmaskError(f"--nodes {job.nodes} and --gpus-per-node {job.procs_per_node} must be at least 1")
    cfg = load_config(job.config, job.overrides)
    world, model_parallel = job.nodes * job.procs_per_node, cfg.parallel.tp * cfg.parallel.pp
    if world % model_parallel:
        raise UnmaskError(f"{job.nodes} node(s) x {job.procs_per_node} = {world} processes is not divisible by "
                          f"parallel.tp * parallel.pp = {model_parallel}")
    return cfg
