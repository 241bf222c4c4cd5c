"""A save that fails on one rank (a full disk, here RLIMIT_FSIZE) fails on every rank with one clear line, leaves
no .tmp- folder and keeps `latest` on the previous valid checkpoint, instead of hanging the other ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unmask.checkpoint.store import verify
from unmask.parallel.dims import free_port

HERE = Path(__file__).parent


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank(tmp_path, failing_rank):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "_enospc_worker.py"), str(tmp_path),
                                       str(failing_rank)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=240) for p in procs]  # a hang here is the bug
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    root = tmp_path / "checkpoints"
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 1, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("unmask: saving checkpoint step 2 into") and ".tmp-step-00000002" in line, line
        assert f"rank {failing_rank}" in line and "free space" in line, line
    assert not list(root.glob(".tmp-*"))
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert verify(root / "step-00000001") is None
    assert not (root / "step-00000002").exists()
