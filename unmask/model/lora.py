"""LoRA (Hu et al. 2021) through peft: adapters on named projections of the plain model, and their merge.

Training: `add_lora` injects peft's LoRA layers into the built model in place (`inject_adapter_in_model`: no
wrapper, so the module and its forward stay unmask's) and freezes everything else; the engines' optimizers take
only parameters that require gradients. State-dict keys become `<name>.base_layer.weight` and
`<name>.lora_{A,B}.default.weight`, which is what checkpoints hold, so a resume restores base and adapters as saved.
Reading: `merge_lora` turns such a state dict into the plain model's keys with peft's own merge
(W + B @ A * alpha / rank), so sample, eval, export and a distillation teacher see an ordinary unmask model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from unmask.config import Config, LoraConfig

ADAPTER = "default"  # peft's adapter name; it appears in the checkpoint's keys


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), bias="none")


def add_lora(model: nn.Module, cfg: Config) -> nn.Module:
    """Inject adapters into `model` (in place; returned for chaining) and freeze the rest. A is drawn from
    train.seed (B starts at zero, so the adapted model starts equal to the base), identically on every rank."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):  # peft draws A on the CPU generator; leave the run's stream alone
        torch.manual_seed(cfg.train.seed)
        model = inject_adapter_in_model(peft_config(cfg.lora), model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)  # peft leaves no other trainable parameter with bias="none"; be explicit
    return model


def is_lora_state(state: Mapping[str, torch.Tensor]) -> bool:
    return any(".lora_A." in k for k in state)


def merge_lora(state: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """A LoRA run's state dict (base + adapters) -> the plain model's state dict with the adapters merged in, by
    peft's merge_and_unload on a model built on the meta device that takes `state`'s tensors."""
    from peft import LoraModel

    from unmask.model.build import build_model

    model = build_model(cfg.model, causal=cfg.causal, block_size=cfg.block_size, device="meta")
    tuner = LoraModel(model, peft_config(cfg.lora), ADAPTER, low_cpu_mem_usage=True)
    missing, unexpected = tuner.model.load_state_dict(dict(state), strict=False, assign=True)
    tied = cfg.model.tie_embeddings and "output.weight"
    missing = [k for k in missing if "_extra_state" not in k and k != tied]
    if missing or unexpected:
        raise ValueError(f"LoRA state dict does not fit lora.rank={cfg.lora.rank}, target_modules="
                         f"{cfg.lora.target_modules} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain = tuner.merge_and_unload(safe_merge=True)  # safe: new tensors, `state`'s are left as they were
    return {k: v.detach() for k, v in plain.state_dict().items()}
