"""Tensor parallelism: swap the plain model's projections for megatron-core's sharded layers, in place.

The model file stays free of ranks (torchtitan's parallelize idea). Each sharded layer receives the exact
slice of the full layer it replaces, so a TP=N model initialised from the same seed computes what the TP=1
model computes:
- wq, wk, wv, w1, w3: ColumnParallelLinear (rows = heads or hidden units split across ranks, no gather);
- wo, w2: RowParallelLinear (input already split; the output is all-reduced);
- tok_embeddings: VocabParallelEmbedding; output: ColumnParallelLinear, leaving the logits vocab-sharded.
Attention takes its local head counts from the projection widths, so it needs no change. The loss then
has to work on vocab-sharded logits: `VocabParallelNLL` replaces the objective's dense cross-entropy.
"""

from __future__ import annotations

import torch
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

_COLUMN = ("wq", "wk", "wv", "w1", "w3")
_ROW = ("wo", "w2")


class _Column(ColumnParallelLinear):
    """Megatron layers return (output, bias); the plain model wants the tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class _Row(RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


def megatron_config(gpu: bool, sequence_parallel: bool = False) -> ModelParallelConfig:
    # perform_initialization=False: weights come from the full model, not megatron's init.
    return ModelParallelConfig(tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                               use_cpu_initialization=not gpu, perform_initialization=False,
                               sequence_parallel=sequence_parallel)


def _shard(full: torch.Tensor, dim: int) -> torch.Tensor:
    rank, world = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    return full.chunk(world, dim=dim)[rank]


def _fill(layer: nn.Module, full: nn.Module, dim: int) -> nn.Module:
    """Copy this rank's slice of `full.weight` into `layer` and mark the weight as tensor-parallel, which
    DeepSpeed and megatron read to count a sharded gradient once per rank in the global grad norm."""
    with torch.no_grad():
        layer.weight.copy_(_shard(full.weight, dim))
    if not hasattr(layer.weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(layer.weight, True, dim, 1)
    return layer.to(full.weight.device)


def apply_tensor_parallel(model: nn.Module) -> nn.Module:
    """Replace the projections and embeddings of an initialised plain `Transformer` by megatron-core layers
    holding this rank's slices. Needs megatron's groups (`setup_parallel`). Returns the same model."""
    if getattr(model, "tp_applied", False):
        return model
    gpu = next(model.parameters()).is_cuda
    mcfg = megatron_config(gpu)
    dtype = next(model.parameters()).dtype
    mcfg.params_dtype = dtype
    init = nn.init.zeros_  # never called: perform_initialization=False
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if name in _COLUMN:
                    layer = _Column(child.in_features, child.out_features, config=mcfg, init_method=init,
                                    bias=False, gather_output=False)
                    setattr(parent, name, _fill(layer, child, 0))
                elif name in _ROW:
                    layer = _Row(child.in_features, child.out_features, config=mcfg, init_method=init, bias=False,
                                 input_is_parallel=True, skip_bias_add=False)
                    setattr(parent, name, _fill(layer, child, 1))
    emb = model.tok_embeddings
    new_emb = VocabParallelEmbedding(emb.num_embeddings, emb.embedding_dim, init_method=init, config=mcfg)
    model.tok_embeddings = _fill(new_emb, emb, 0)
    out = model.output
    new_out = _Column(out.in_features, out.out_features, config=mcfg, init_method=init, bias=False,
                      gather_output=False)
    if model.cfg.tie_embeddings:
        # Both shard rows [V/tp, D] by the same contiguous vocab ranges, so one parameter serves both.
        del new_out.weight
        new_out.weight = model.tok_embeddings.weight
        model.output = new_out.to(out.weight.device)
    else:
        model.output = _fill(new_out, out, 0)
    model.tp_applied = True
    return model


class VocabParallelNLL:
    """The objective's `.nll` on vocab-sharded logits [N, V/tp] (megatron's vocab_parallel_cross_entropy).

    The `<mask>` logit is suppressed on the shard that owns that vocabulary row only."""

    def nll(self, logits: torch.Tensor, targets: torch.Tensor, suppress: int | None = None) -> torch.Tensor:
        # vocab_parallel_cross_entropy subtracts the max from its input in place: give it a private fp32 copy.
        logits = logits.to(torch.float32, copy=True)
        if suppress is not None:
            start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
            if start <= suppress < start + logits.shape[-1]:
                logits[:, suppress - start] = float("-inf")
        return vocab_parallel_cross_entropy(logits, targets)
