"""A training run's curves as PNGs from its metrics.jsonl (for `unmask plot RUN_DIR` and the run's artifacts):
loss.png (training loss with the validation NELBO over it: both are nats per token), val.png (validation
perplexity bound) and lr.png.

A resumed run appends to metrics.jsonl, possibly re-logging steps after its checkpoint: the last row
logged for a step wins, which is what the resumed run actually trained."""

from __future__ import annotations

import json
from pathlib import Path

from unmask.errors import UnmaskError


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training rows, validation rows), each step -> row."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UnmaskError(f"{path} does not exist; pass the run_dir of a training run (train.run_dir)")
    train, val = {}, {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed mid-write leaves half a last line
                continue
            raise UnmaskError(f"{path}:{n}: not a JSON object; the metrics file is damaged") from None
        if "step" in row:
            (val if "val_nelbo" in row else train)[int(row["step"])] = row
    return train, val


def series(rows: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    steps = [s for s in sorted(rows) if isinstance(rows[s].get(key), int | float)]
    return steps, [rows[s][key] for s in steps]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs (into run_dir/plots by default) and return their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    if not train and not val:
        raise UnmaskError(f"{run_dir / 'metrics.jsonl'} has no metrics rows yet; plot after the first log step")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "loss": [("training loss", train, "loss", "-"), ("validation NELBO", val, "val_nelbo", "o-")],
        "val": [("validation perplexity bound", val, "val_ppl_bound", "o-")],
        "lr": [("learning rate", train, "lr", "-")],
    }
    ylabels = {"loss": "nats / token", "val": "perplexity bound (exp NELBO)", "lr": "learning rate"}
    written = []
    for name, lines in figures.items():
        lines = [(label, *series(rows, key), style) for label, rows, key, style in lines]
        if not any(steps for _, steps, _, _ in lines):
            continue  # e.g. no validation in this run
        fig = Figure(figsize=(6, 4), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, steps, values, style in lines:
            if steps:
                ax.plot(steps, values, style, label=label, markersize=3)
        if name == "val":
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabels[name])
        ax.set_title(f"{run_dir.name}: {name}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png")
        written.append(out / f"{name}.png")
    return written
