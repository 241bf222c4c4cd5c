"""Rank discovery from torchrun and SLURM variables, and SLURM's node-list syntax."""

import os

import pytest

from unmask.errors import UnmaskError
from unmask.launcher.env import DistEnv, discover, expand_nodelist, expand_tasks_per_node, export_torch_env

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in TORCH_VARS:
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("a1,b2,c3", ["a1", "b2", "c3"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("gpu[3]-ib", ["gpu3-ib"]),
    ("x[1,3-4],y", ["x1", "x3", "x4", "y"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node1-3]", "node[a-b]", "node[3-1]", "a,,b", "n[[1]]", ""])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(UnmaskError, match="node list"):
        expand_nodelist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(UnmaskError, match="tasks-per-node"):
        expand_tasks_per_node("2(3)")


def test_single_process(clean_env):
    assert discover() == DistEnv()


def test_torchrun(clean_env):
    for key, value in {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                       "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node01", "MASTER_PORT": "29400",
                       "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node[01-02]"}.items():
        clean_env.setenv(key, value)  # torchrun under srun: torchrun's variables win
    assert discover() == DistEnv(5, 8, 1, 4, "node01", 29400, "torchrun")
    before = dict(os.environ)
    assert export_torch_env().source == "torchrun"
    assert dict(os.environ) == before


SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
              "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
              "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_slurm_task_without_torchrun(clean_env):
    env = dict(SLURM_TASK)
    dist = export_torch_env(env)
    assert dist == DistEnv(5, 8, 1, 4, "gpu07", 20000 + 4242, "slurm")
    assert {k: env[k] for k in dist.torch_vars()} == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                       "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
                                                       "MASTER_PORT": "24242"}
    assert export_torch_env(env) == dist  # idempotent
    assert discover(env) == dist


def test_slurm_uneven_nodes_and_user_port(clean_env):
    env = {**SLURM_TASK, "SLURM_STEP_NUM_TASKS": "5", "SLURM_PROCID": "4", "SLURM_NODEID": "1",
           "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "4,1", "MASTER_PORT": "12345"}
    dist = export_torch_env(env)
    assert (dist.world_size, dist.local_world_size, dist.master_port) == (5, 1, 12345)
    assert env["MASTER_PORT"] == "12345"


def test_slurm_batch_shell_is_one_process(clean_env):
    # inside the sbatch script (no srun step) SLURM_PROCID=0 and SLURM_NTASKS=2 are set, but it is one process
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "vm"}
    assert export_torch_env(env).source == "single"
    assert "RANK" not in env


def test_malformed_variable_is_named(clean_env):
    with pytest.raises(UnmaskError, match="SLURM_PROCID='x'"):
        discover({**SLURM_TASK, "SLURM_PROCID": "x"})
