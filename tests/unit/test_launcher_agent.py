"""The SLURM torchrun agent: requeue exit codes and rendezvous defaults."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from tests.support.runs import HANG_GUARD_S
from unmask.launcher.agent import is_requeue, with_slurm_rendezvous
from unmask.launcher.env import REQUEUE_EXIT_CODE


def failed(*codes: int) -> ChildFailedError:
    return ChildFailedError("unmask", {rank: ProcessFailure(rank, 100 + rank, code, "<N/A>")
                                       for rank, code in enumerate(codes)})


@pytest.mark.parametrize("codes, requeue", [
    ((REQUEUE_EXIT_CODE,), True),
    ((REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE), True),
    ((REQUEUE_EXIT_CODE, -signal.SIGTERM), True),  # a slower worker stopped by torchrun after the first exit
    ((1,), False),
    ((REQUEUE_EXIT_CODE, 1), False),  # a crash anywhere is a crash
    ((-signal.SIGTERM, REQUEUE_EXIT_CODE), True),
    ((-signal.SIGTERM,), False),
])
def test_is_requeue(codes, requeue):
    assert is_requeue(failed(*codes)) is requeue


def test_rendezvous_from_slurm(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_") or k == "TORCHELASTIC_RUN_ID"]:
        monkeypatch.delenv(key)
    args = ["--nnodes", "2", "-m", "unmask", "train", "c.toml"]
    assert with_slurm_rendezvous(args) == args  # not under SLURM: unchanged
    for key, value in {"SLURM_JOB_ID": "77", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
                       "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[01-02]"}.items():
        monkeypatch.setenv(key, value)
    assert with_slurm_rendezvous(args) == ["--rdzv_endpoint", "gpu01:20077", "--rdzv_id", "slurm-77", *args]
    given = ["--rdzv-endpoint=h:1", "--rdzv_id", "mine", *args]
    assert with_slurm_rendezvous(given) == given


@pytest.mark.distributed
@pytest.mark.parametrize("exit_code, agent_code", [(REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE), (7, 1)])
def test_agent_passes_requeue_exit_code_through(exit_code, agent_code, tmp_path):
    """A real torchrun with two workers that exit with `exit_code` (bare torchrun would exit 1 for 3 and 7)."""
    script = tmp_path / "worker.py"
    script.write_text(f"import sys\nsys.exit({exit_code})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-m", "unmask.launcher.agent", "--nnodes", "1", "--nproc_per_node", "2",
                           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(script)],
                          cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == agent_code, proc.stderr[-3000:]
