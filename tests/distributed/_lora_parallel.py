"""torchrun worker: LoRA runs through the DeepSpeed engine, one per ZeRO stage in the JSON spec.

usage: _lora_parallel.py OUT.json '{"runs": [{"name": ..., "sections": {...}, "steps": N}, ...]}'
Rank 0 writes, per run, the losses, gradient norms and validation terms (with a weight EMA: also those of the
EMA, whose per-rank files go under OUT's folder, `ema-<name>/ema/`), which parameters require gradients and the
elements the torch optimizer holds on this rank; every rank saves its engine files under OUT's folder,
`ckpt-<name>/engine/` (what a checkpoint holds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _parallel_common import make_cfg, train, write_result


def main() -> None:
    spec = json.loads(sys.argv[2])
    results = {}
    for run in spec["runs"]:
        out = train(make_cfg(**run["sections"]), run["steps"], ema_dir=Path(sys.argv[1]).parent / f"ema-{run['name']}")
        engine = out["engine"]
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps unmask's torch AdamW
        results[run["name"]] = {
            **{k: out[k] for k in ("loss", "grad_norm", "eval", "ema_eval", "eval_after") if k in out},
            "trainable": sorted(n for n, p in engine.model.named_parameters() if p.requires_grad),
            "optimizer_numel": sum(p.numel() for g in inner.param_groups for p in g["params"]),
        }
        engine.save(str(Path(sys.argv[1]).parent / f"ckpt-{run['name']}"), "engine")
    write_result(results)


if __name__ == "__main__":
    main()
