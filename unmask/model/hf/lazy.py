"""A Hugging Face weight folder read one tensor at a time (`--init-from` of an `unmask export`).

Construction fills the model parameter by parameter and keeps only this rank's slice of each full tensor
(unmask.model.build.materialize), so a state that is read on demand lets a rank hold its share plus one full
tensor in transit, never the whole model: `LazyState` is a read-only Mapping of plain keys whose `[key]` opens
the safetensors file and reads that tensor alone. `load_into` is `load_state_dict` for such a state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn


class LazyState(Mapping):
    """Plain key -> fp32 tensor, read from `sources[key] = (file, key in the file)` when asked for. `reads`
    counts the tensors read (tests check that nothing is read twice or ahead of time). `transforms[key]` maps a
    tensor after reading (an imported causal LM's embeddings gain their `<mask>` row there) and `grown[key]` says
    how many rows it adds, so `shape` stays a header read."""

    def __init__(self, sources: dict[str, tuple[Path, str] | torch.Tensor],
                 transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 grown: dict[str, int] | None = None):
        self.sources = sources  # a tensor value is held already (a small one computed from several stored ones)
        self.transforms = transforms or {}
        self.grown = grown or {}
        self.reads = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        source = self.sources[key]  # KeyError for a key the folder does not have, as a dict
        if isinstance(source, torch.Tensor):
            return source
        file, stored = source
        with safe_open(str(file), framework="pt") as f:
            tensor = f.get_tensor(stored)
        self.reads += 1
        tensor = tensor.to(torch.float32)
        return self.transforms[key](tensor) if key in self.transforms else tensor

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self.sources

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def shape(self, key: str) -> list[int]:
        """The stored shape of `key`, from the file's header (no tensor read)."""
        from safetensors import safe_open

        source = self.sources[key]
        if isinstance(source, torch.Tensor):
            return list(source.shape)
        file, stored = source
        with safe_open(str(file), framework="pt") as f:
            shape = list(f.get_slice(stored).get_shape())
        return [shape[0] + self.grown.get(key, 0), *shape[1:]]


def safetensors_sources(folder: Path) -> dict[str, tuple[Path, str]] | None:
    """Stored key -> (safetensors file, key) of a `save_pretrained` folder (one file or an index), from the headers
    only; None when the folder has no safetensors (an older pytorch_model.bin)."""
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: (folder / f, k) for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as f:
        return {k: (single, k) for k in f.keys()}


@torch.no_grad()
def load_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """`model.load_state_dict(state)` (strict, same errors) that reads `state` one tensor at a time, so a lazy
    state is never whole in memory; a tied parameter is read once."""
    if isinstance(state, dict):
        model.load_state_dict(state)
        return model
    name = model.__class__.__name__
    targets = model.state_dict(keep_vars=True)
    errors = []
    if missing := [k for k in targets if k not in state]:
        errors.append("Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
    if unexpected := [k for k in state if k not in targets]:
        errors.append("Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
    if errors:
        raise RuntimeError("Error(s) in loading state_dict for {}:\n\t{}".format(name, "\n\t".join(errors)))
    done: set[int] = set()
    for key, target in targets.items():
        if id(target) in done:
            continue
        done.add(id(target))
        value = state[key]
        if value.shape != target.shape:
            raise RuntimeError(f"Error(s) in loading state_dict for {name}:\n\tsize mismatch for {key}: copying a "
                               f"param with shape {value.shape} from checkpoint, the shape in current model is "
                               f"{target.shape}.")
        target.copy_(value)
    return model
