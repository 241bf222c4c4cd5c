"""Building the plain model of a run: the unmask side of unmask.core's backbones (they read any config by
attribute; this is where unmask's ModelConfig picks the family and where the meta-device build happens).

Two ways to give a model its weights:
- `build_model(..., device)`: materialise everything and `init_weights()` from torch's global RNG (inference,
  consolidation, tests that want a whole model);
- `build_model(..., "meta")`, parallelize, then `materialize(module, init, seed)`: each parameter is drawn in full
  from its own generator, seeded by (seed, plain parameter name), and only this rank's slice of it is kept. The
  same seed therefore gives the same full weights in every layout, and a rank holds its share plus one full
  tensor in transit (torchtitan's meta build -> parallelize -> init_weights, made per parameter).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from unmask.config import ModelConfig
from unmask.core.bert_blocks import BertTransformer
from unmask.core.transformer import Transformer

# (plain name, full-size tensor, generator) -> fills the tensor in place; Transformer.init_parameter is one.
InitRule = Callable[[str, torch.Tensor, torch.Generator], None]


def build_model(cfg: ModelConfig, causal: bool = False, device: str | torch.device = "cpu",
                block_size: int = 0) -> nn.Module:
    """Build on the meta device (no memory touched), materialise on `device`, then `init_weights()`.

    arch "unmask" gives a `Transformer`, arch "bert" (an imported BERT/RoBERTa) a `BertTransformer`. The caller
    seeds torch beforehand; parallel wrappers may be applied between the meta build and materialisation by
    building with `device="meta"` and calling `materialize` (or `to_empty` + `init_weights`) themselves.
    """
    with torch.device("meta"):
        model = new_model(cfg, causal, block_size)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights()
    return model


def new_model(cfg: ModelConfig, causal: bool = False, block_size: int = 0) -> nn.Module:
    """The plain model of `cfg.arch`, constructed under whatever device or ZeRO-3 context the caller opened:
    "unmask" gives a `Transformer` (block_size > 0: block diffusion's block-causal attention), "bert" a
    `BertTransformer`. Both have `init_parameter`, the per-parameter rule sharded builds use."""
    if cfg.arch == "bert":
        return BertTransformer(cfg, causal=causal)
    return Transformer(cfg, causal=causal, block_size=block_size)


def param_seed(seed: int, name: str) -> int:
    """The generator seed of plain parameter `name`: independent of layout, rank and construction order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def full_shape(p: torch.Tensor) -> list[int]:
    """The shape of the whole parameter that `p` is this rank's tensor-parallel slice of."""
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        from unmask.parallel.tensor import tp_world

        shape[p.partition_dim] *= tp_world()
    return shape


def own_slice(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    if not getattr(p, "tensor_model_parallel", False):
        return full
    from unmask.parallel.tensor import tp_slice

    return tp_slice(full, p.partition_dim)


@torch.no_grad()
def fill_parameter(name: str, p: torch.Tensor, init: InitRule, seed: int, source: Mapping | None = None) -> None:
    """Fill `p` (this rank's part of plain parameter `name`) from `source[name]` if given, else from `init`: the
    full tensor is made once, sliced and freed."""
    if source is not None:
        if name not in source:
            raise KeyError(f"initial weights have no {name!r} (have {len(source)} keys, e.g. {next(iter(source))!r}); "
                           "pass a state dict of this model's plain layout (unmask.model.hf.init.init_from)")
        full = source[name].to(device=p.device, dtype=p.dtype)
        if list(full.shape) != full_shape(p):
            raise ValueError(f"initial weight {name!r} has shape {list(full.shape)}, the model wants "
                             f"{full_shape(p)}: the --init-from model and this config differ")
    else:
        generator = torch.Generator(device=p.device).manual_seed(param_seed(seed, name))
        if not getattr(p, "tensor_model_parallel", False):
            return init(name, p, generator)  # the whole parameter is ours: no copy in transit
        full = torch.empty(full_shape(p), dtype=p.dtype, device=p.device)
        init(name, full, generator)
    p.copy_(own_slice(p, full))


def materialize(module: nn.Module, device: str | torch.device, init: InitRule, seed: int,
                plain_name: Callable[[str], str] = lambda n: n, source: Mapping | None = None) -> nn.Module:
    """Give every parameter of `module` (meta or already allocated at shard size) its weights on `device`, one
    parameter at a time (`fill_parameter`). `plain_name` maps the module's parameter names to the plain model's
    (a pipeline layer's `block.x` -> `layers.3.x`); tied parameters stay one parameter. Buffers must be
    non-persistent or already real (unmask's Transformer has none)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    params: dict[int, tuple[str, nn.Parameter]] = {}
    for mod_name, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod, pname))
            params.setdefault(id(p), (f"{mod_name}.{pname}" if mod_name else pname, p))
    for key, (name, p) in params.items():
        new = p
        if p.is_meta or p.device.type != torch.device(device).type:
            new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)  # tensor-parallel attributes
            for mod, pname in owners[key]:
                setattr(mod, pname, new)
        fill_parameter(plain_name(name), new, init, seed, source)
    for name, b in module.named_buffers():
        if b.is_meta:
            raise ValueError(f"buffer {name!r} is still on the meta device; materialize fills parameters only")
    return module
