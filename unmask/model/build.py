"""Building the plain model of a run: the unmask side of unmask.core's backbones (they read any config by
attribute; this is where unmask's ModelConfig picks the family and where the meta-device build happens)."""

from __future__ import annotations

import torch
from torch import nn

from unmask.config import ModelConfig
from unmask.core.bert_blocks import BertTransformer
from unmask.core.transformer import Transformer


def build_model(cfg: ModelConfig, causal: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """Build on the meta device (no memory touched), materialise on `device`, then `init_weights()`.

    arch "unmask" gives a `Transformer`, arch "bert" (an imported BERT/RoBERTa) a `BertTransformer`. The caller
    seeds torch beforehand; parallel wrappers may be applied between the meta build and materialisation by
    building with `device="meta"` and calling `to_empty` + `init_weights` themselves.
    """
    family = BertTransformer if cfg.arch == "bert" else Transformer
    with torch.device("meta"):
        model = family(cfg, causal=causal)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights()
    return model
