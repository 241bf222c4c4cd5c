"""What rank 0 shows while training: a tqdm bar (loss, tokens/s, MFU, ETA) on a terminal, and one plain line
per logged row when the output is a file (SLURM logs), where a redrawn bar would be noise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

SHOWN = ("loss", "tokens_per_s", "mfu", "lr", "grad_norm", "peak_mem_gib")  # in this order, when present
ON_BAR = {"loss": "loss", "tokens_per_s": "tok/s", "mfu": "mfu"}  # the bar has room for few


def fmt(key: str, value) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    if key == "mfu":
        return f"{value:.1%}"
    if key == "tokens_per_s":
        return f"{value / 1e3:.2f}k" if value >= 1e3 else f"{value:.0f}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Console:
    def __init__(self, total_steps: int, enabled: bool, initial_step: int = 0, stream: TextIO | None = None):
        """initial_step: where a resumed run starts, so the bar and the ETA count only the steps left."""
        self.total, self.enabled, self.initial = total_steps, enabled, initial_step
        self.stream = stream or sys.stdout
        self.t0, self.step = time.perf_counter(), initial_step
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, file=self.stream, unit="step",
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, row: dict) -> None:
        """A metrics row (training or validation) with its `step`: advance the bar or print one line."""
        if not self.enabled:
            return
        step = int(row.get("step", self.step))
        shown = {k: row[k] for k in SHOWN if k in row}
        extra = {k: v for k, v in row.items() if k.startswith("val_")}
        if self.bar is not None:
            if shown:
                self.bar.set_postfix({ON_BAR[k]: fmt(k, v) for k, v in shown.items() if k in ON_BAR},
                                     refresh=False)
            self.bar.update(max(step - self.bar.n, 0))
            if extra:  # validation rows stay visible above the bar
                self.note(f"step {step}: " + " ".join(f"{k}={fmt(k, v)}" for k, v in extra.items()))
        else:
            parts = [f"step {step}/{self.total}"] + [f"{k}={fmt(k, v)}" for k, v in (shown | extra).items()]
            eta = self.eta(step)
            if eta is not None and not extra:
                parts.append(f"eta={fmt_duration(eta)}")
            print(" ".join(parts), file=self.stream, flush=True)
        self.step = step

    def eta(self, step: int) -> float | None:
        """Seconds left at the average pace since this console started (so a resume's skipped steps do not count)."""
        done = step - self.initial
        if done <= 0:
            return None
        return (time.perf_counter() - self.t0) / done * max(self.total - step, 0)

    def note(self, text: str) -> None:
        """A message that does not break the bar (checkpoint saved, resumed, ...)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
