"""An exponential moving average of the weights (MDLM keeps one with decay 0.9999 and evaluates and samples with it).

After update n (counted from 1) the average moves by 1 - decay_n towards the weights, with MDLM's warm-up
`decay_n = min(decay, (1 + n) / (10 + n))` (kuleshov-group/mdlm models/ema.py), so early averages are not
dominated by the random init. The average covers this rank's own storage of the weights (engine.local_weights():
whole parameters, tensor-parallel shards, pipeline-stage layers or ZeRO-3 partitions), in fp32 on the storage's
device: no rank ever holds more of the EMA than of the weights. Under LoRA only the adapters train, so only they
are averaged (a checkpoint's EMA weights are its frozen base with the averaged adapters merged in). Under bf16
DeepSpeed that storage is the bf16 module weights, not the optimizer's fp32 masters, so the average is of
bf16-rounded weights (kept in fp32).

The checkpoint keeps one file per piece of the average, `ema/tpTT-ppPP-dpDDDDD.pt`, with its layout (what
unmask.checkpoint.consolidate needs to rebuild the full EMA weights): ZeRO-3 partitions one per data-parallel rank,
whole weights (replicated over data-parallel ranks) only data-parallel rank 0's, so a checkpoint holds one EMA of the
model however many replicas trained it, and a run resumed under another data-parallel size finds its file.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from unmask.engines.base import LocalWeights
from unmask.errors import CheckpointError


def ema_file(folder: Path, layout: dict) -> Path:
    """The file of the piece of the EMA that a rank with this layout (LocalWeights.layout()) holds."""
    dp_rank = layout["dp_rank"] if layout["kind"] == "zero3" else 0
    return Path(folder) / "ema" / f"tp{layout['tp_rank']:02d}-pp{layout['pp_stage']:02d}-dp{dp_rank:05d}.pt"


def warmup_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates` (1 for the first)."""
    return min(decay, (1 + updates) / (10 + updates))


class EMA:
    """The average of `weights()` (called each time: engines may replace their storage on a checkpoint load)."""

    def __init__(self, weights: Callable[[], LocalWeights], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay}: an EMA needs a decay in (0, 1) (0 turns it off)")
        self.weights, self.decay = weights, decay
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Start over from the current weights."""
        self.updates = 0
        self.shadow = {n: t.detach().to(torch.float32, copy=True) for n, t in self.weights().tensors.items()}

    @torch.no_grad()
    def update(self) -> None:
        """After an applied optimizer step (never after a skipped one: the weights did not move)."""
        self.updates += 1
        rate = 1.0 - warmup_decay(self.decay, self.updates)
        for name, live in self.weights().tensors.items():
            s = self.shadow[name]
            s.sub_(rate * (s - live.float()))

    @contextlib.contextmanager
    def applied(self):
        """The EMA in the live storage for the block (validation), the raw weights back afterwards, bit-identical
        (restored from a copy, not recomputed)."""
        local = self.weights()
        backup = {n: t.clone() for n, t in local.tensors.items()}
        self._write(local, self.shadow)
        try:
            yield
        finally:
            self._write(local, backup)

    @torch.no_grad()
    def _write(self, local: LocalWeights, values: dict[str, torch.Tensor]) -> None:
        for name, live in local.tensors.items():
            live.copy_(values[name])
        if local.sync is not None:
            local.sync()

    # ---------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        return {"tensors": self.shadow, "updates": self.updates, "decay": self.decay,
                "layout": self.weights().layout()}

    def save(self, folder: Path) -> None:
        """This rank's piece under a checkpoint folder being written (Checkpointer.save's write step); a replica of
        whole weights on data-parallel rank > 0 writes nothing."""
        layout = self.weights().layout()
        if layout["kind"] == "full" and layout["dp_rank"] > 0:
            return
        path = ema_file(folder, layout)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**self.state_dict(), "tensors": {n: t.cpu() for n, t in self.shadow.items()}}, path)

    def load(self, folder: Path) -> None:
        """Restore from a checkpoint: the file of this rank's piece (whole weights: the one file of its tensor rank
        and stage, whatever the data-parallel size). A checkpoint without EMA files starts the average from the
        restored weights."""
        layout = self.weights().layout()
        path = ema_file(folder, layout)
        if not (Path(folder) / "ema").is_dir():
            warnings.warn(f"{folder} has no EMA (saved with train.ema_decay=0); the EMA starts from its weights",
                          stacklevel=2)
            self.reset()
            return
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint's EMA files do not match its layout")
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["tensors"]
        if state["layout"]["kind"] != layout["kind"] or saved.keys() != self.shadow.keys() or any(
                saved[n].shape != t.shape for n, t in self.shadow.items()):
            raise CheckpointError(f"{path}: the saved EMA ({state['layout']['kind']}) does not fit this run's weights "
                                  f"({layout['kind']}); resume with the saved layout or train.ema_decay=0")
        self.shadow = {n: saved[n].to(t.device, torch.float32) for n, t in self.shadow.items()}
        self.updates = int(state["updates"])
