"""`unmask launch`: the torchrun command and the sbatch script it renders."""

import argparse
import shlex
import subprocess
from pathlib import Path

import pytest

from unmask.cli import main
from unmask.errors import UnmaskError
from unmask.launcher.commands import Job, Slurm, render_sbatch, slurm_time_seconds, torchrun_command
from unmask.launcher.env import REQUEUE_EXIT_CODE

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.toml")


def test_torchrun_command_multinode():
    job = Job("configs/tiny.toml", ["--train.steps=5"], nodes=2, procs_per_node=8, rdzv_endpoint="node01:29400")
    assert shlex.join(torchrun_command(job)) == (
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node01:29400 "
        "--rdzv_id unmask-tiny -m unmask train configs/tiny.toml --train.steps=5")


def test_torchrun_command_needs_endpoint_past_one_node():
    assert "127.0.0.1:0" in torchrun_command(Job("c.toml"))
    with pytest.raises(UnmaskError, match="needs --rdzv-endpoint"):
        torchrun_command(Job("c.toml", nodes=2))
    with pytest.raises(UnmaskError, match="not HOST:PORT"):
        torchrun_command(Job("c.toml", rdzv_endpoint="node01"))


def test_sbatch_torchrun_launcher():
    job = Job("configs/tiny.toml", ["--train.steps=5"], nodes=4, procs_per_node=8)
    script = render_sbatch(job, Slurm(time="04:00:00", partition="gpu", signal_seconds=600, workdir="/w",
                                      python="/env/bin/python", extra=["--qos=high"]))
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=04:00:00", "#SBATCH --partition=gpu", "#SBATCH --chdir=/w", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --signal=USR1@600", "#SBATCH --qos=high",
                 "#SBATCH --cpus-per-task=64",  # 8 cores for each of the task's 8 ranks
                 "srun --kill-on-bad-exit=1 /env/bin/python -m unmask.launcher.agent --nnodes 4 --nproc_per_node 8 "
                 "--rdzv_backend c10d "
                 "-m unmask train configs/tiny.toml --train.steps=5",
                 f'if [ "$rc" -eq {REQUEUE_EXIT_CODE} ]; then', '  scontrol requeue "$SLURM_JOB_ID"']:
        assert line in script.splitlines(), line
    assert "B:USR1" not in script and "{{" not in script
    assert script.startswith("#!/bin/bash\n")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_sbatch_srun_launcher_on_cpus():
    job = Job("c.toml", nodes=1, procs_per_node=2)
    script = render_sbatch(job, Slurm(launcher="srun", gpus=False, python="py", cpus_per_task=1))
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --cpus-per-task=1" in script
    assert "gpus-per-node" not in script
    assert "\nsrun --kill-on-bad-exit=1 py -m unmask train c.toml\n" in script


def test_sbatch_exports_the_collective_environment_and_keeps_the_jobs_own():
    from unmask.config import Config

    env = Config().launch.env_vars
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    script = render_sbatch(Job("c.toml"), Slurm(python="py", env=env))
    assert 'export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"' in script.splitlines()
    assert script.index("export CUDA_DEVICE_MAX_CONNECTIONS") < script.index("\nsrun ")
    out = subprocess.run(["bash", "-c", 'NCCL_DEBUG=INFO; export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"; echo $NCCL_DEBUG'],
                         capture_output=True, text=True).stdout
    assert out.strip() == "INFO"


def test_launch_refuses_loader_workers_that_do_not_fit_the_cores(capsys):
    from unmask.launcher.cli import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([TINY, "--slurm", "--gpus-per-node", "4", "--cpus-per-gpu", "2"])
    args.overrides = ["--data.num_workers=2"]
    with pytest.raises(UnmaskError, match="data.num_workers=2 .* 2 core"):
        run(args)
    args.overrides = ["--data.num_workers=1"]
    assert run(args) == 0
    assert "#SBATCH --cpus-per-task=8" in capsys.readouterr().out


def test_sbatch_signal_must_fit_in_time_limit():
    with pytest.raises(UnmaskError, match="--signal-seconds 600"):
        render_sbatch(Job("c.toml"), Slurm(time="5", signal_seconds=600))


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("30:15", 1815), ("04:00:00", 14400),
                                           ("1-12", 129600), ("1-0:30", 88200), ("2-01:00:05", 176405)])
def test_slurm_time(text, seconds):
    assert slurm_time_seconds(text) == seconds


def test_cli_prints_command(capsys):
    assert main(["launch", TINY, "--nodes", "2", "--gpus-per-node", "4", "--rdzv-endpoint", "h:1",
                 "--train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("torchrun --nnodes 2 --nproc_per_node 4") and out.rstrip().endswith("--train.steps=3")


def test_cli_writes_sbatch(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    assert main(["launch", TINY, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--out", str(out)]) == 0
    assert "#SBATCH --nodes=2" in out.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--train.nope=1"], "unknown key 'train.nope'"),
    (["--parallel.tp=3", "--gpus-per-node", "4"], "not divisible by parallel.tp"),
    (["--slurm", "--time", "soon"], "--time 'soon'"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(["launch", TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
