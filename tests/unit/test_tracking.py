"""Tracker round trip through a real mlflow sqlite store: params, metrics, artifacts read back with MlflowClient;
a resumed run appends to the same mlflow run."""

import subprocess
import sys

import pytest

from unmask.config import load_config
from unmask.tracking import Tracker, tracking_uri


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tracked") / "run"  # one sqlite store for the module (creating one takes ~10 s)


def cfg(**tracking):
    return load_config(None, {"model": {"size": "tiny"}, "train": {"steps": 7},
                              "tracking": {"enabled": True, **tracking}})


def client(tracker):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracker.uri)


def test_unmask_import_does_not_import_mlflow():
    code = "import sys, unmask.tracking, unmask.train.console; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_uri_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(cfg(uri="http://mlflow:5000"), tmp_path) == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking_uri(cfg(uri="http://mlflow:5000"), tmp_path) == "http://server:5000"


def test_disabled_tracker_does_nothing(tmp_path):
    for tracker in (Tracker(cfg(), tmp_path, enabled=False), Tracker(load_config(None, {}), tmp_path, enabled=True)):
        assert tracker.start() is None
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.log_artifact(tmp_path)
        tracker.close()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow  # trains or starts a process: tens of seconds on 2 loaded cores
def test_round_trip_and_resume(run_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    c = cfg()
    tracker = Tracker(c, run_dir, enabled=True)
    run_id = tracker.start()
    assert tracker.uri == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    for step in (1, 2, 3):
        tracker.log_metrics({"step": step, "loss": 4.0 - step, "tokens_per_s": 100.0 * step, "note": "x"}, step)
    sample = run_dir / "samples.txt"
    sample.write_text("a generated sample\n")
    tracker.log_artifact(sample, "samples")
    tracker.close()

    mc = client(tracker)
    run = mc.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in c.flat().items()}  # the whole flattened config
    assert run.data.tags["system.torch"] and run.data.tags["system.python"]
    assert [(m.step, m.value) for m in mc.get_metric_history(run_id, "loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert "note" not in run.data.metrics and "step" not in run.data.metrics
    arts = {a.path for a in mc.list_artifacts(run_id)} | {a.path for a in mc.list_artifacts(run_id, "samples")}
    assert {"config.toml", "samples/samples.txt"} <= arts
    assert mc.download_artifacts(run_id, "config.toml", str(run_dir / "dl")).endswith("config.toml")
    assert (run_dir / "dl" / "config.toml").read_text() == c.to_toml()
    assert (run_dir / "mlartifacts").is_dir()  # artifacts beside the sqlite store, not in the cwd

    # Resume: the run id kept in the checkpoint continues the same mlflow run; params are not logged again
    # (a resumed config may differ in train.steps), metrics append.
    resumed = Tracker(cfg(), run_dir, enabled=True)
    assert resumed.start(run_id) == run_id
    assert client(resumed).get_run(run_id).info.status == "RUNNING"
    resumed.log_metrics({"loss": 0.5}, 4)
    resumed.close()
    history = mc.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert len(mc.search_runs([run.info.experiment_id])) == 1
    assert "unmask.resumed_at" in mc.get_run(run_id).data.tags


def test_unknown_run_id_starts_a_new_run(run_dir, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg(), run_dir, enabled=True)
    run_id = tracker.start("0" * 32)
    tracker.close()
    assert run_id != "0" * 32
    assert "is not in" in capsys.readouterr().err
    assert client(tracker).get_run(run_id).info.status == "FINISHED"


def test_env_uri_wins(tmp_path, run_dir, monkeypatch):
    """MLFLOW_TRACKING_URI (a server in production; here the module's sqlite store) overrides the default."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{run_dir.resolve()}/mlflow.db")
    tracker = Tracker(cfg(experiment="other"), tmp_path / "elsewhere", enabled=True)
    run_id = tracker.start()
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.close()
    assert not (tmp_path / "elsewhere" / "mlflow.db").exists()
    assert client(tracker).get_experiment_by_name("other") is not None
    assert client(tracker).get_run(run_id).data.metrics == {"loss": 1.0}
