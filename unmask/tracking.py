"""Experiment tracking with mlflow: params (the flattened config), metrics, artifacts and system info.

Only rank 0 tracks (`enabled`); on other ranks every method is a no-op. The store is, in order:
MLFLOW_TRACKING_URI (a real server), `tracking.uri`, else an embedded sqlite database `<run_dir>/mlflow.db`
(mlflow 3 refuses the plain `file:` store unless MLFLOW_ALLOW_FILE_STORE=true; sqlite needs no server).

Calls from the train loop only enqueue: one background thread talks to the store, so a slow server or a
sqlite write never stalls a step (bench/tracking.py prints the overhead). mlflow is imported lazily, in
`start`, since most commands never track. A resumed run passes the run id kept in its checkpoint and keeps
appending to the same mlflow run.
"""

from __future__ import annotations

import logging
import os
import platform
import queue
import sys
import threading
import time
from pathlib import Path

from unmask.config import Config

_STOP = object()
MAX_BATCH = 1000  # mlflow's log_batch limit on metrics per call; params are limited to 100


def tracking_uri(cfg: Config, run_dir: Path) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
            or f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}")


def system_info() -> dict[str, str]:
    import torch

    info = {"host": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "cpu_count": str(os.cpu_count()),
            "world_size": os.environ.get("WORLD_SIZE", "1"), "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": str(torch.cuda.device_count()),
                 "cuda": str(torch.version.cuda)}
    try:
        from importlib.metadata import version

        info["unmask"] = version("unmask")
    except Exception:  # not installed (run from a checkout)
        pass
    return {k: v for k, v in info.items() if v}


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, enabled: bool):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.enabled = enabled and cfg.tracking.enabled
        self.run_id: str | None = None
        self.uri = tracking_uri(cfg, self.run_dir) if self.enabled else None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def start(self, run_id: str | None = None) -> str | None:
        """Resume mlflow run `run_id` (from a checkpoint) or create one; returns the run id to save."""
        if not self.enabled:
            return None
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow.store.db.utils"):  # a new sqlite store's schema migrations are chatty
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                self.client.set_tag(run_id, "unmask.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
            except MlflowException:
                # The checkpoint outlived its store (another URI, a deleted mlflow.db): keep training, say so.
                print(f"unmask: mlflow run {run_id} is not in {self.uri}; starting a new run", file=sys.stderr)
        if self.run_id is None:
            self.run_id = self._create_run()
        self._thread = threading.Thread(target=self._work, name="unmask-tracking", daemon=True)
        self._thread.start()
        return self.run_id

    def _create_run(self) -> str:
        from mlflow.entities import Param

        name = self.cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            # A sqlite store keeps artifacts beside its database, not in ./mlartifacts of whatever the cwd is.
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
            exp_id = self.client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        tags = {f"system.{k}": v for k, v in system_info().items()}
        run = self.client.create_run(exp_id, run_name=self.run_dir.name, tags={"unmask.run_dir": str(
            self.run_dir.resolve()), **tags})
        params = [Param(k, str(v)[:6000]) for k, v in self.cfg.flat().items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i:i + 100], synchronous=True)
        self.client.log_text(run.info.run_id, self.cfg.to_toml(), "config.toml")
        return run.info.run_id

    def log_metrics(self, row: dict, step: int) -> None:
        """Enqueue the numeric values of a metrics row (the `step` key itself is the x axis, not a metric)."""
        if self.run_id is None:
            return
        values = {k: float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
        self._queue.put(("metrics", values, int(step), int(time.time() * 1000)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or directory into the run's artifacts (in the background; the file must not change
        before close)."""
        if self.run_id is not None:
            self._queue.put(("artifact", Path(path), artifact_path))

    def close(self, status: str = "FINISHED") -> None:
        """Flush everything queued, then mark the run FINISHED (or FAILED / KILLED)."""
        if self.run_id is None or self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        self.client.set_terminated(self.run_id, status)
        if self._error:
            print(f"unmask: mlflow logging failed, some data was not recorded: {self._error}", file=sys.stderr)

    def _work(self) -> None:
        from mlflow.entities import Metric

        while True:
            items = [self._queue.get()]
            while len(items) < MAX_BATCH and items[-1] is not _STOP:  # one store round trip for many rows
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is _STOP
            items = [item for item in items if item is not _STOP]
            metrics = [Metric(k, v, ts, step) for kind, *rest in items if kind == "metrics"
                       for values, step, ts in [rest] for k, v in values.items()]
            try:
                for i in range(0, len(metrics), MAX_BATCH):
                    self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_BATCH], synchronous=True)
                for kind, *rest in items:
                    if kind == "artifact":
                        path, artifact_path = rest
                        log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
                        log(self.run_id, str(path), artifact_path)
            except Exception as e:  # never let tracking kill training; report once at close
                self._error = self._error or f"{type(e).__name__}: {e}"
            if stop:
                return
