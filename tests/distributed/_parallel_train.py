"""torchrun worker: train the tiny model through the real engines for each run in a JSON spec.

usage: _parallel_train.py OUT.json '{"runs": [{"name": ..., "sections": {...}, "steps": N}, ...]}'
Rank 0 writes {name: {"loss": [...], "grad_norm": [...]}}; a run with train.ema_decay > 0 also its EMA
validation, and every rank its EMA file under OUT's folder, `ema-<name>/ema/`. Several runs share one launch (and one
DeepSpeed import), which keeps the suite fast; they must share a layout (tp, pp)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _parallel_common import make_cfg, train, write_result


def main() -> None:
    spec = json.loads(sys.argv[2])
    results = {}
    for run in spec["runs"]:
        cfg = make_cfg(**run["sections"])
        out = train(cfg, run["steps"], ema_dir=Path(sys.argv[1]).parent / f"ema-{run['name']}")
        results[run["name"]] = {k: out[k] for k in ("loss", "grad_norm", "eval", "ema_eval", "eval_after") if k in out}
    write_result(results)


if __name__ == "__main__":
    main()
