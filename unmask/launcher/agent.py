"""`python -m unmask.launcher.agent [torchrun arguments]`: torchrun, with what a SLURM job needs added.

The sbatch script runs this (one per node, under srun) instead of bare torchrun, because bare torchrun
1. dies of SIGUSR1 (default action) when SLURM sends its warning before the time limit, orphaning the
   workers. Here the agent survives it. Under SLURM it does not forward it: slurmstepd signals every
   process of the step (proctrack/cgroup and linuxproc track torchrun's workers although they start their
   own sessions), and a second, later copy could reach a worker that has already saved and restored the
   default action. Outside SLURM (a signal sent to the agent by hand) it forwards to the workers;
2. turns every worker failure into exit code 1; here workers that all exit with REQUEUE_EXIT_CODE make
   the agent exit with it, so the sbatch script can tell "saved, requeue me" from a crash;
3. needs --rdzv_endpoint/--rdzv_id on every node; under SLURM they default to the job's first node (port
   derived from the job id) and the job id.
"""

from __future__ import annotations

import os
import signal
import sys

from unmask.launcher.env import REQUEUE_EXIT_CODE, discover


def with_slurm_rendezvous(argv: list[str]) -> list[str]:
    """Prepend --rdzv_endpoint/--rdzv_id from SLURM when the arguments do not give them."""
    dist = discover()
    given = {a.split("=", 1)[0].replace("-", "_") for a in argv}
    extra = []
    if dist.source == "slurm" and "__rdzv_endpoint" not in given:
        extra += ["--rdzv_endpoint", f"{dist.master_addr}:{dist.master_port}"]
    if dist.source == "slurm" and "__rdzv_id" not in given:
        extra += ["--rdzv_id", f"slurm-{os.environ.get('SLURM_JOB_ID', 'job')}"]
    return extra + argv


def _ignore(signum: int, _frame) -> None:
    pass  # a handler, not SIG_IGN: SIG_IGN would be inherited by the workers through exec


def _forward_to_workers(signum: int, _frame) -> None:
    import psutil

    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> int:
    # first thing: the default action would kill this agent
    signal.signal(signal.SIGUSR1, _ignore if "SLURM_JOB_ID" in os.environ else _forward_to_workers)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(with_slurm_rendezvous(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as e:
        if is_requeue(e):
            print(f"unmask agent: workers exited with {REQUEUE_EXIT_CODE} (state saved): requeue", file=sys.stderr)
            return REQUEUE_EXIT_CODE
        print(e.format_msg(), file=sys.stderr)
        return 1
    return 0


def is_requeue(error) -> bool:
    """Workers asked for a requeue. torchrun stops the other workers with SIGTERM as soon as one exits, so
    workers a few milliseconds slower show up as killed by SIGTERM (torchrun's failure timestamps have
    one-second resolution, so which exit came first is unknown); a crash anywhere has its own exit code."""
    codes = {f.exitcode for f in error.failures.values()}
    return REQUEUE_EXIT_CODE in codes and codes <= {REQUEUE_EXIT_CODE, -signal.SIGTERM}


if __name__ == "__main__":
    sys.exit(main())
