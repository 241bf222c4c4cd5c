"""A training run logs to mlflow (local sqlite store); its resume appends to the same mlflow run."""

from __future__ import annotations

from tests.support.runs import tiny_config
from unmask.train.loop import train


def test_run_and_resume_log_to_one_mlflow_run(tiny_shards, tmp_path):
    fast = ("--train.log_every=2", "--train.val_every=4", "--train.threads=1", "--checkpoint.interval_steps=4",
            "--tracking.enabled=true")
    train(tiny_config(tiny_shards, tmp_path, "--train.steps=4", *fast))
    train(tiny_config(tiny_shards, tmp_path, "--train.steps=8", *fast))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("unmask").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model.size"] == "tiny" and run.data.params["train.seq_len"] == "128"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_nelbo")] == [4, 8]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "plots", "tokenizer"} <= artifacts
    assert run.info.status == "FINISHED"
