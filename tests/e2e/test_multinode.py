"""Multi-node path on one machine: two torchrun agents (`--nnodes 2 --nproc_per_node 1`, c10d rendezvous on
127.0.0.1), each started by `unmask launch --run`, train the tiny model with the DeepSpeed engine (DP=2)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 6

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def tiny_overrides(shards: Path, run_dir: Path) -> list[str]:
    return [f"--data.train_dir={shards / 'train'}", f"--data.val_dir={shards / 'val'}", "--model.size=tiny",
            "--train.seq_len=128", f"--train.steps={STEPS}", "--train.log_every=2", "--train.val_every=0",
            "--train.val_batches=1", "--train.micro_batch_size=4", "--train.threads=1",
            f"--train.run_dir={run_dir}", "--parallel.engine=deepspeed"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_train_row(run_dir: Path) -> dict:
    """The last training row of metrics.jsonl: its step is the final one and its token count shows that two
    processes trained as one data-parallel world (two separate runs would count half)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {k: v for k, v in ([r for r in rows if "loss" in r] or [{}])[-1].items() if k in ("step", "tokens")}


def test_two_torchrun_agents_train_to_the_end(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "unmask", "launch", str(REPO / "configs" / "tiny.toml"), "--nodes", "2",
           "--gpus-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "e2e-multinode",
           "--run", *tiny_overrides(tiny_shards, run_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    logs = [tmp_path / f"agent{i}.log" for i in range(2)]
    agents = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
              for log in logs]
    try:
        codes = [a.wait(timeout=900) for a in agents]  # a hang guard, not a speed check
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    report = "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)
    assert codes == [0, 0], report
    assert last_train_row(run_dir) == {"step": STEPS, "tokens": STEPS * 4 * 2 * 128}, report
