"""torchrun worker: a NaN gradient (finite loss) injected on rank 0 at one step must be skipped on every rank, leave
the weights exactly as they were, and training must go on finite afterwards.

usage: _nonfinite.py OUT.json '{"runs": [{"name": ..., "sections": {...}}, ...]}' (runs share a layout)
Rank 0 writes {name: {"skipped": [...], "unchanged": bool, "finite": bool, "moved": bool}}; every rank asserts."""

from __future__ import annotations

import json
import sys

import torch
from _parallel_common import SPECIAL, make_cfg, rank_batches, write_result


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def inject(module, inputs, output):
    if isinstance(output, tuple):
        return (NanGrad.apply(output[0]), *output[1:])
    return NanGrad.apply(output)


def weights(engine) -> list[torch.Tensor]:
    # ZeRO-3 keeps this rank's partition in ds_tensor; every other layout holds the parameter itself.
    return [getattr(p, "ds_tensor", p).detach().float().clone() for p in engine.model.parameters()]


def run(cfg) -> dict:
    from unmask.engines import build_components
    from unmask.parallel.dims import setup_parallel

    dims = setup_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    engine = build_components(cfg, dims, torch.device("cpu"), SPECIAL).engine
    skipped = []
    for step in range(3):
        if step == 1:
            before = weights(engine)
            hook = engine.model.register_forward_hook(inject) if dims.rank == 0 else None
        skipped.append(engine.train_step(*rank_batches(cfg, step, dims.dp, dims.dp_rank)).skipped)
        if step == 1:
            after = weights(engine)
            if hook is not None:
                hook.remove()
    final = weights(engine)
    return {"skipped": skipped,
            "unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
            "finite": all(bool(torch.isfinite(w).all()) for w in after + final),
            "moved": any(not torch.equal(a, b) for a, b in zip(after, final, strict=True))}


def main() -> None:
    results = {}
    for spec in json.loads(sys.argv[2])["runs"]:
        r = run(make_cfg(**spec["sections"]))
        assert r == {"skipped": [False, True, False], "unchanged": True, "finite": True, "moved": True}, (spec, r)
        results[spec["name"]] = r
    write_result(results)


if __name__ == "__main__":
    main()
