"""A real one-node SLURM cluster (tests/e2e/slurm/setup_local_slurm.sh: munged, slurmctld, slurmd) runs the
sbatch scripts `unmask launch --slurm` renders: training to the end with 2 tasks, and a requeue after the
time-limit warning signal."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unmask.launcher.commands import Job, Slurm, render_sbatch
from unmask.launcher.env import expand_nodelist

REPO = Path(__file__).resolve().parents[2]
SETUP = Path(__file__).parent / "slurm" / "setup_local_slurm.sh"
PROBE = Path(__file__).parent / "slurm" / "preempt_probe.py"
STEPS = 6

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def slurm_env() -> dict:
    """Environment for sbatch/scontrol against the local cluster (started here if it is not running)."""
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    if proc.returncode == 77:
        pytest.skip(f"no SLURM: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"{SETUP} failed:\n{proc.stdout}\n{proc.stderr}"
    conf = re.search(r"SLURM_CONF=(\S+)\)", proc.stdout).group(1)
    yield {**os.environ, "SLURM_CONF": conf, "PYTHONPATH": str(REPO)}
    subprocess.run(["bash", str(SETUP), "stop"], timeout=120)  # no daemon outlives the tests


def tiny_overrides(shards: Path, run_dir: Path) -> list[str]:
    return [f"--data.train_dir={shards / 'train'}", f"--data.val_dir={shards / 'val'}", "--model.size=tiny",
            "--train.seq_len=128", f"--train.steps={STEPS}", "--train.log_every=2", "--train.val_every=0",
            "--train.val_batches=1", "--train.micro_batch_size=4", "--train.threads=1",
            f"--train.run_dir={run_dir}", "--parallel.engine=deepspeed"]


def last_train_row(run_dir: Path) -> dict:
    """The last training row of metrics.jsonl: its step is the final one and its token count shows that two
    processes trained as one data-parallel world (two separate runs would count half)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {k: v for k, v in ([r for r in rows if "loss" in r] or [{}])[-1].items() if k in ("step", "tokens")}


def job_field(job_id: str, key: str, env: dict) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    match = re.search(rf"\b{key}=(\S+)", out)
    return match.group(1) if match else ""


def test_nodelist_parser_matches_scontrol(slurm_env):
    for nodelist in ["node[01-03,07],gpu-a[1-2]", "n[8-11]", "rack[1-2]-n[01-02]", "a1,b[001-002]"]:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             env=slurm_env, check=True).stdout
        assert expand_nodelist(nodelist) == out.split(), nodelist


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_sbatch_job_trains_to_the_end(launcher, slurm_env, tiny_shards, tmp_path):
    """torchrun: one srun task runs the agent, which starts 2 workers; srun: 2 SLURM tasks, ranks from SLURM_*."""
    run_dir, script, log = tmp_path / "run", tmp_path / "job.sbatch", tmp_path / "job.out"
    subprocess.run([sys.executable, "-m", "unmask", "launch", str(REPO / "configs" / "tiny.toml"), "--slurm",
                    "--launcher", launcher, "--nodes", "1", "--gpus-per-node", "2", "--cpu-only", "--cpus-per-gpu", "1",
                    "--time", "30:00", "--signal-seconds", "60", "--log", str(log), "--out", str(script),
                    *tiny_overrides(tiny_shards, run_dir)], cwd=REPO, env=slurm_env, check=True)
    try:
        proc = subprocess.run(["sbatch", "--wait", "--parsable", str(script)], capture_output=True, text=True,
                              env=slurm_env, timeout=1200)  # a hang guard, not a speed check
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", "unmask-tiny"], env=slurm_env)
        raise
    output = log.read_text()[-6000:] if log.exists() else "(no job log)"
    assert proc.returncode == 0, f"sbatch --wait: {proc.returncode} {proc.stderr}\n{output}"
    assert last_train_row(run_dir) == {"step": STEPS, "tokens": STEPS * 4 * 2 * 128}, output


def test_time_limit_signal_saves_and_requeues(slurm_env, tmp_path):
    """--time=2 with --signal=USR1@60: SLURM warns 30-60 s in (it checks every 30 s). The probe (standing in
    for training, which saves then exits with REQUEUE_EXIT_CODE) gets SIGUSR1 through torchrun's agent, the
    agent exits with that code, the script requeues the job and the second attempt completes."""
    log = tmp_path / "job.out"
    script = render_sbatch(Job("configs/tiny.toml", nodes=1, procs_per_node=2),
                           Slurm(time="2", signal_seconds=60, gpus=False, output=str(log), job_name="unmask-requeue",
                                 cpus_per_gpu=1),
                           entry=[str(PROBE), str(tmp_path)])
    (tmp_path / "job.sbatch").write_text(script)
    job = subprocess.run(["sbatch", "--parsable", str(tmp_path / "job.sbatch")], capture_output=True, text=True,
                         env=slurm_env, check=True).stdout.strip().split(";")[0]
    deadline = time.monotonic() + 600  # a hang guard, not a speed check
    state = ""
    while time.monotonic() < deadline:
        state = job_field(job, "JobState", slurm_env)  # a requeued job waits cred_expire (10 s here) to restart
        if state in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL"):
            break
        time.sleep(2)
    else:
        subprocess.run(["scancel", job], env=slurm_env)
    output = log.read_text() if log.exists() else "(no job log)"
    assert state == "COMPLETED" and job_field(job, "Restarts", slurm_env) == "1", f"{state}\n{output}"
    assert sorted(p.name for p in tmp_path.glob("attempt*.ready")) == [
        "attempt0-rank0.ready", "attempt0-rank1.ready", "attempt1-rank0.ready", "attempt1-rank1.ready"]
    assert "requeueing" in output, output
    counts = [p.read_text().strip() for p in tmp_path.glob("attempt0-rank*.signals")]
    assert counts and set(counts) == {"1"}, f"each worker gets SIGUSR1 once, got {counts}"


def test_preempted_training_saves_requeues_and_resumes(slurm_env, tiny_shards, tmp_path):
    """SIGUSR1 to the running job (the same delivery as the time-limit warning) while both ranks wait at the end
    of step 20 (a named fault point, so the signal never races the run): training saves and exits with
    REQUEUE_EXIT_CODE, the job is requeued, and the second attempt resumes and trains to the end."""
    steps, run_dir, script, log = 40, tmp_path / "run", tmp_path / "job.sbatch", tmp_path / "job.out"
    overrides = [o for o in tiny_overrides(tiny_shards, run_dir) if not o.startswith(("--train.steps=",
                                                                                      "--train.log_every="))]
    subprocess.run([sys.executable, "-m", "unmask", "launch", str(REPO / "configs" / "tiny.toml"), "--slurm",
                    "--nodes", "1", "--gpus-per-node", "2", "--cpu-only", "--cpus-per-gpu", "1", "--time", "30:00",
                    "--job-name",
                    "unmask-preempt", "--log", str(log), "--out", str(script), f"--train.steps={steps}",
                    "--train.log_every=10", *overrides], cwd=REPO, env=slurm_env, check=True)
    pause = {**slurm_env, "UNMASK_FAULTS": "step.end@20=pause"}
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=pause,
                         check=True).stdout.strip().split(";")[0]
    deadline, state, signalled = time.monotonic() + 900, "", False  # a hang guard, not a speed check
    while time.monotonic() < deadline:
        state = job_field(job, "JobState", slurm_env)
        paused = log.read_text().count("paused at step.end@20") if log.exists() else 0
        if not signalled and paused == 2:  # both ranks wait at the end of step 20
            subprocess.run(["scancel", "--signal=USR1", job], env=slurm_env, check=True)
            signalled = True
        if state in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL"):
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job], env=slurm_env)
    output = log.read_text() if log.exists() else "(no job log)"
    report = f"{state}\n{output[-6000:]}"
    assert signalled and state == "COMPLETED" and job_field(job, "Restarts", slurm_env) == "1", report
    assert last_train_row(run_dir) == {"step": steps, "tokens": steps * 4 * 2 * 128}, report
    second = output.partition("requeueing")[2]
    resumed_at = [int(n) for n in re.findall(r"^step (\d+)/", second, re.M)]  # the console's plain lines
    assert second and resumed_at and resumed_at[0] == 30, f"second attempt did not resume:\n{report}"
