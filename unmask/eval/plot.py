"""The quality-versus-steps plot (PNG): one line per sampler or model, horizontal lines for references
such as real text. Uses matplotlib's Agg canvas directly, so no display and no global pyplot state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_quality_vs_steps(series: Mapping[str, Sequence[tuple[int, float]]], path: str | Path,
                          ylabel: str = "generative perplexity", references: Mapping[str, float] | None = None,
                          title: str | None = None, log_y: bool = True) -> Path:
    """series: name -> [(steps, value)]; references: name -> value drawn as a dashed line. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{len(series) + i}", label=name)
    ax.set_xscale("log", base=2)  # step counts are powers of two (16 ... 1024)
    steps = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(steps, [str(s) for s in steps])
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
