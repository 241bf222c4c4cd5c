"""Where a run's numbers go: metrics.jsonl, mlflow (when enabled) and the console, all on rank 0 only."""

from __future__ import annotations

from pathlib import Path

from unmask.config import Config
from unmask.tracking import Tracker
from unmask.train.console import Console
from unmask.train.metrics import MetricsLog


class Reporter:
    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, initial_step: int, run_id: str | None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=enabled)
        self.tracker = Tracker(cfg, self.run_dir, enabled=enabled)
        self.run_id = self.tracker.start(run_id)  # a resumed run continues its mlflow run
        self.console = Console(cfg.train.steps, enabled=enabled, initial_step=initial_step)

    def row(self, row: dict) -> None:
        self.log.write(row)
        self.tracker.log_metrics(row, row["step"])
        self.console.update(row)

    def note(self, text: str) -> None:
        self.console.note(text)

    def finish(self, status: str, artifacts: dict[str, list[Path]] | None = None) -> None:
        """Flush and close; on success also plot the curves and keep plots/tokenizer as run artifacts."""
        if self.enabled and status == "FINISHED":
            from unmask.eval.curves import plot_run

            for path in plot_run(self.run_dir):
                self.tracker.log_artifact(path, "plots")
            for name, paths in (artifacts or {}).items():
                for path in paths:
                    if Path(path).exists():
                        self.tracker.log_artifact(path, name)
        self.console.close()
        self.tracker.close(status)
