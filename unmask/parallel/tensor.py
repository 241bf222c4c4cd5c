"""Tensor parallelism as a declarative plan: module-name pattern -> how megatron-core shards it.

The model file stays free of ranks (torchtitan's `parallelize_module` plans). `apply_tensor_parallel` swaps each
planned module for a megatron-core layer holding this rank's exact slice of the full weight, so a TP=N model
initialised from the same seed computes what the TP=1 model computes; `merge_tensor_parallel`, its inverse,
concatenates per-rank state dicts back into full weights (export, consolidation). Styles:
- column: ColumnParallelLinear, output features split (heads or hidden units), no gather; weight dim 0;
- row: RowParallelLinear, input already split, output all-reduced; weight dim 1;
- vocab: VocabParallelEmbedding, vocabulary rows split; weight dim 0.
The output head is column-parallel, leaving the logits vocab-sharded, so the objective is built with
`vocab_parallel_nll`. Attention takes its local head counts from the projection widths, so it needs no change.
Tied weights stay tied: a module whose weight is a parameter already sharded shares the new shard (the tied
output head and the embedding split vocabulary rows by the same contiguous ranges).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from unmask.parallel import collective

# unmask's Transformer. Modules are sharded in the model's own order, so the embedding comes before the output
# head that may share its weight.
TP_PLAN: dict[str, str] = {
    "tok_embeddings": "vocab",
    "layers.*.attention.wq": "column",
    "layers.*.attention.wk": "column",
    "layers.*.attention.wv": "column",
    "layers.*.attention.wo": "row",
    "layers.*.feed_forward.w1": "column",
    "layers.*.feed_forward.w3": "column",
    "layers.*.feed_forward.w2": "row",
    "output": "column",
}
_SPLIT_DIM = {"column": 0, "row": 1, "vocab": 0}


def plan_style(name: str, plan: dict[str, str]) -> str | None:
    """The style of module `name` in `plan` (`*` matches one dotted segment), or None if it is replicated."""
    parts = name.split(".")
    for pattern, style in plan.items():
        pat = pattern.split(".")
        if len(pat) == len(parts) and all(fnmatchcase(p, q) for p, q in zip(parts, pat, strict=True)):
            return style
    return None


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]], plan: dict[str, str]) -> dict[str, torch.Tensor]:
    """Full weights from per-rank state dicts (rank order): planned weights concatenated along the dimension their
    style splits, everything else (norms, time conditioning) replicated, taken from rank 0."""
    out = {}
    for key, first in shards[0].items():
        module, _, kind = key.rpartition(".")
        dim = split_dim(plan_style(module, plan), kind)
        out[key] = first if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return out


def split_dim(style: str | None, kind: str = "weight") -> int | None:
    """The dimension along which a planned module's `kind` ("weight" or "bias") is split, None if replicated: a
    column layer's bias is split with its output features, a row layer's is whole (added after the all-reduce)."""
    if style is None or (kind == "bias" and style == "row"):
        return None
    return 0 if kind == "bias" else _SPLIT_DIM[style]


class _Column(ColumnParallelLinear):
    """Megatron layers return (output, bias); the plain model wants the tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class _VocabEmbedding(VocabParallelEmbedding):
    """The vocab-parallel counterpart of `TokenEmbedding`: token ids as megatron embeds them, and probabilities
    over the vocabulary [..., V] (Duo's soft inputs, whole on every rank) as this rank's slice of them times its
    rows, summed over the group (forward all-reduce, identity backward)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.probabilities(tokens) if tokens.is_floating_point() else super().forward(tokens)

    def probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        local = probs[..., self.vocab_start_index:self.vocab_end_index].to(self.weight.dtype) @ self.weight
        return reduce_from_tensor_model_parallel_region(local)


class _Row(RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


def megatron_config(gpu: bool, sequence_parallel: bool = False) -> ModelParallelConfig:
    # perform_initialization=False: weights come from the full model, not megatron's init.
    return ModelParallelConfig(tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                               use_cpu_initialization=not gpu, perform_initialization=False,
                               sequence_parallel=sequence_parallel)


def tp_world() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_slice(full: torch.Tensor, dim: int) -> torch.Tensor:
    """This tensor-parallel rank's contiguous slice of `full` along `dim` (megatron's partition)."""
    return full.chunk(tp_world(), dim=dim)[parallel_state.get_tensor_model_parallel_rank()]



def _fill(layer: nn.Module, full: nn.Module, style: str, tied: nn.Parameter | None = None) -> nn.Module:
    """Copy this rank's slice of `full.weight` (or share `tied`, the shard of the weight it is tied to) and of its
    bias (`split_dim`) into `layer`, and mark the weight as tensor-parallel, which DeepSpeed and megatron read to
    count a sharded gradient once per rank in the global grad norm (megatron marks a column bias itself; a row
    bias is replicated)."""
    dim = split_dim(style)
    with torch.no_grad():
        if tied is not None:
            del layer.weight
            layer.weight = tied
        else:
            layer.weight.copy_(tp_slice(full.weight, dim))
        if getattr(full, "bias", None) is not None:
            bias_dim = split_dim(style, "bias")
            layer.bias.copy_(full.bias if bias_dim is None else tp_slice(full.bias, bias_dim))
    if not hasattr(layer.weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(layer.weight, True, dim, 1)
    return layer.to(full.weight.device)


def _sharded_layer(style: str, full: nn.Module, mcfg: ModelParallelConfig) -> nn.Module:
    init = nn.init.zeros_  # never called: perform_initialization=False
    if style == "vocab":
        return _VocabEmbedding(full.num_embeddings, full.embedding_dim, init_method=init, config=mcfg)
    bias = full.bias is not None  # Qwen2's q/k/v, every BERT projection
    if style == "column":
        return _Column(full.in_features, full.out_features, config=mcfg, init_method=init, bias=bias,
                       gather_output=False)
    if style == "row":
        return _Row(full.in_features, full.out_features, config=mcfg, init_method=init, bias=bias,
                    input_is_parallel=True, skip_bias_add=False)
    raise ValueError(f"tensor-parallel style {style!r}; allowed: column, row, vocab")


def apply_tensor_parallel(model: nn.Module, plan: dict[str, str] = TP_PLAN, gpu: bool | None = None,
                          plain_name=lambda n: n) -> nn.Module:
    """Replace every module that `plan` names by a megatron-core layer holding this rank's slice. Needs megatron's
    groups (`setup_parallel`). Returns the same model, changed in place.

    On an initialised model the slice is copied from the full weight. On a meta-device model (sharded
    construction) the layers are allocated at shard size, uninitialised, for `unmask.model.build.materialize`;
    `gpu` then says where (default: CUDA if available). `plain_name` maps module names to the plain model's
    (a pipeline layer holds `block.attention.wq` for `layers.3.attention.wq`)."""
    if getattr(model, "tp_applied", False):
        return model
    first = next(model.parameters())
    meta = first.is_meta
    on_gpu = (torch.cuda.is_available() if gpu is None else gpu) if meta else first.is_cuda
    mcfg = megatron_config(on_gpu)
    mcfg.params_dtype = first.dtype
    shards: dict[int, nn.Parameter] = {}  # id(full weight) -> its shard, so tied weights stay one parameter
    planned = [(n, m) for n, m in model.named_modules() if plan_style(plain_name(n), plan)]
    for name, full in planned:
        style = plan_style(plain_name(name), plan)
        layer = _sharded_layer(style, full, mcfg)
        tied = shards.get(id(full.weight))
        if meta:
            if tied is not None:
                del layer.weight
                layer.weight = tied
            elif not hasattr(layer.weight, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(layer.weight, True, split_dim(style), 1)
        else:
            layer = _fill(layer, full, style, tied)
        shards.setdefault(id(full.weight), layer.weight)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    model.tp_applied = True
    return model


def vocab_parallel_nll(logits: torch.Tensor, targets: torch.Tensor, suppress: int | None = None) -> torch.Tensor:
    """The objectives' `nll` on vocab-sharded logits [N, V/tp] (megatron's vocab_parallel_cross_entropy) -> [N].

    The `<mask>` logit is suppressed on the shard that owns that vocabulary row only."""
    # vocab_parallel_cross_entropy subtracts the max from its input in place: give it a private fp32 copy.
    logits = logits.to(torch.float32, copy=True)
    if suppress is not None:
        start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
        if start <= suppress < start + logits.shape[-1]:
            logits[:, suppress - start] = float("-inf")
    return vocab_parallel_cross_entropy(logits, targets)


def vocab_parallel_stats(logits: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor):
    """`unmask.core.uniform_state.vocab_stats` on vocab-sharded logits [..., V/tp]: (sum_log_xbar, xbar(x_t),
    xbar(x_0)) [...] in float64, xbar = V alpha_t softmax(logits) + 1 - alpha_t over the whole vocabulary.

    The softmax's max is all-reduced without gradient (it cancels); the sum of exponentials, the sum of log xbar
    and xbar at x_t / x_0 (taken on the shard that owns the token, 0 elsewhere) are summed over the group by
    megatron's reduce_from_tensor_model_parallel_region, whose identity backward hands each rank the gradient of
    its own terms (the loss downstream is the same on every rank)."""
    local = logits.double()
    width = local.shape[-1]
    V = width * tp_world()
    start = parallel_state.get_tensor_model_parallel_rank() * width
    group = parallel_state.get_tensor_model_parallel_group()
    top = local.detach().amax(-1, keepdim=True)
    collective.all_reduce_(top, group=group, op=torch.distributed.ReduceOp.MAX)
    shifted = (local - top).exp()  # [..., V/tp]
    # The sum enters every rank's xbar: copy_to's all-reduce in backward collects its gradient from all of them.
    total = copy_to_tensor_model_parallel_region(
        reduce_from_tensor_model_parallel_region(shifted.sum(-1, keepdim=True)))  # [..., 1]
    a = alpha_t.double()[..., None]
    xbar = V * a * shifted / total + 1 - a  # [..., V/tp]
    sum_log = reduce_from_tensor_model_parallel_region(xbar.log().sum(-1))

    def at(tokens):
        owned = (tokens >= start) & (tokens < start + width)
        picked = xbar.gather(-1, (tokens - start).clamp(0, width - 1)[..., None])[..., 0]
        return reduce_from_tensor_model_parallel_region(torch.where(owned, picked, torch.zeros_like(picked)))

    return sum_log, at(xt), at(x0)
