"""torchrun worker: a TP=N model against the TP=1 model of the same seed, in one process group.

Writes the largest differences of logits, loss and every gradient (gathered from the shards)."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from _parallel_common import MASK_ID, PAD_ID, make_cfg, rank_batches, write_result
from megatron.core import parallel_state

from unmask.diffusion.objective import build_objective
from unmask.model.build import build_model
from unmask.parallel.dims import setup_parallel
from unmask.parallel.tensor import TP_PLAN, apply_tensor_parallel, merge_tensor_parallel, vocab_parallel_nll


def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def main() -> None:
    world = int(os.environ["WORLD_SIZE"])
    variants = {"untied": {}, "tied": {"tie_embeddings": True},
                "qkv_bias": {"qkv_bias": True},  # a Qwen2 import: column-parallel q/k/v biases
                "bert": {"arch": "bert", "n_kv_heads": None, "tie_embeddings": True}}  # biases everywhere
    write_result({name: compare(make_cfg(parallel={"tp": world, "engine": "deepspeed"}, model=fields))
                  for name, fields in variants.items()})


def compare(cfg) -> dict:
    setup_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    ref = build_model(cfg.model)
    model = apply_tensor_parallel(copy.deepcopy(ref), TP_PLAN)
    objective = build_objective(cfg.diffusion, MASK_ID, PAD_ID, cfg.train.seed)
    tp_objective = build_objective(cfg.diffusion, MASK_ID, PAD_ID, cfg.train.seed, nll=vocab_parallel_nll)
    (x0, *_), (key, *_) = rank_batches(cfg, 0, 1, 0)
    c = objective.corrupt(x0, key)

    ref_logits = ref(*c.inputs)
    ref_loss = objective.loss_from_logits(ref_logits, c.targets).loss
    ref_loss.backward()
    logits = model(*c.inputs)
    loss = tp_objective.loss_from_logits(logits, c.targets).loss
    loss.backward()

    ref_params = dict(ref.named_parameters())
    grad_diff, sharded = {}, 0
    for name, p in model.named_parameters():
        g = p.grad
        if getattr(p, "tensor_model_parallel", False):
            g, sharded = gather(g, p.partition_dim), sharded + 1
        grad_diff[name] = float((g - ref_params[name].grad).abs().max())
    # The plan's inverse: every rank's shard state merged back equals the full model's state.
    shards = [None] * dist.get_world_size()
    mine = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    dist.all_gather_object(shards, mine)
    merged, full = merge_tensor_parallel(shards, TP_PLAN), ref.state_dict()
    return {
        "merge_keys": sorted(merged) == sorted(full),
        "merge": max(float((merged[k] - full[k]).abs().max()) for k in full),
        "logits": float((gather(logits.detach(), -1) - ref_logits.detach()).abs().max()),
        "loss": abs(float(loss.detach()) - float(ref_loss.detach())), "ref_loss": float(ref_loss.detach()),
        "grads": grad_diff, "sharded": sharded, "n_ref_params": len(ref_params),
        "local_vocab": logits.shape[-1],
    }


if __name__ == "__main__":
    main()
