"""Pipeline parallelism: the plain model's block list cut into DeepSpeed `PipelineModule` stages.

Layers: embedding, one layer per block, then final norm + output head; blocks are split evenly over stages
(`partition_method="type:_BlockLayer"`), the embedding joins the first stage and the head the last.
Between stages only the hidden state [B, L, D] travels. Noise is a function of BatchKey, so every stage
runs `objective.corrupt` itself: the first stage takes the corrupted tokens, the last stage the targets,
and the objective's `loss_from_logits` is the pipeline loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from unmask.config import Config
from unmask.model.transformer import rotary_tables
from unmask.parallel.dims import ParallelDims
from unmask.parallel.engine import (
    DeepSpeedCheckpointing,
    clip_hook,
    deepspeed_config,
    keep_fp32_buffers,
    prepare_deepspeed,
    prepare_model,
)
from unmask.train.engine import StepStats
from unmask.train.optim import build_optimizer, build_scheduler


class _EmbedLayer(nn.Module):
    def __init__(self, tok_embeddings: nn.Module):
        super().__init__()
        self.tok_embeddings = tok_embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)


class _BlockLayer(nn.Module):
    """A block with the rotary tables of its input's length, so any stage can run it."""

    def __init__(self, block: nn.Module, head_dim: int, rope_theta: float):
        super().__init__()
        self.block, self.head_dim, self.rope_theta = block, head_dim, rope_theta

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block(h, *rotary_tables(self.head_dim, h.shape[1], self.rope_theta, device=h.device))


class _HeadLayer(nn.Module):
    def __init__(self, norm: nn.Module, output: nn.Module):
        super().__init__()
        self.norm, self.output = norm, output

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))


def build_pipeline_module(model: nn.Module, objective, dims: ParallelDims):
    """A PipelineModule over the (possibly tensor-parallel) model, with DeepSpeed's topology laid out as
    megatron's groups (see dims.py), so tensor-parallel peers are the same ranks in both libraries."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layers = [_EmbedLayer(model.tok_embeddings)]
    layers += [_BlockLayer(b, model.cfg.head_dim, model.cfg.rope_theta) for b in model.layers]
    layers.append(_HeadLayer(model.norm, model.output))
    topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)

    def loss_fn(logits, targets):
        return objective.loss_from_logits(logits, targets).loss

    # dynamic_shape: shapes may change between steps (random-length crops, validation batches).
    return PipelineModule(layers, topology=topology, loss_fn=loss_fn, partition_method="type:_BlockLayer",
                          dynamic_shape=True)


class PipelineEngine(DeepSpeedCheckpointing):
    """The LocalEngine interface on a DeepSpeed PipelineEngine (`.ds`)."""

    def __init__(self, cfg: Config, model: nn.Module, objective, dims: ParallelDims):
        import deepspeed

        prepare_deepspeed()
        self.cfg, self.objective, self.dims = cfg, objective, dims
        prepare_model(cfg, model, objective, dims)
        module = build_pipeline_module(model, objective, dims)
        del model  # layers of other stages are freed with it
        optimizer = build_optimizer(module, cfg.optim)
        if cfg.parallel.zero_stage == 0 and cfg.train.dtype == "fp32":
            optimizer.register_step_pre_hook(clip_hook(cfg.optim.grad_clip))
        self.scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        ds_config = deepspeed_config(cfg, dims)
        # Partitioned stage transfers cache the first shape; dynamic shapes need whole tensors.
        ds_config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
        restore = keep_fp32_buffers(module)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                             lr_scheduler=self.scheduler, config=ds_config)
        restore()
        self.model = self.ds.module
        self.device = self.ds.device

    def train_step(self, micro_batches, keys) -> StepStats:
        lr = self.scheduler.get_last_lr()[0]
        data = []
        for x0, key in zip(micro_batches, keys, strict=True):
            c = self.objective.corrupt(x0.to(self.device), key)
            data.append((c.inputs[0], c.targets))
        # train_batch runs grad_accum micro-batches, steps, and returns the mean loss over them and dp.
        loss = float(self.ds.train_batch(iter(data)))
        norm = self.ds.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        skipped = not self.ds.was_step_applied() or not (torch.isfinite(torch.tensor([loss, norm])).all())
        return StepStats(loss, norm, lr, bool(skipped))

    @torch.no_grad()
    def eval_terms(self, x0, time_samples, seed):
        """The objective's eval on the pipeline: each network call is one inference pass; only the last stage
        sees logits, so its terms are broadcast to the other stages of its pipeline."""
        from megatron.core import parallel_state as ps

        def network(tokens):
            dummy = torch.zeros(1, device=self.device)
            # eval_batch adds the logits to the last training loss it still holds (DeepSpeed 0.19): clear it.
            self.ds.total_loss = None
            _, logits = self.ds.eval_batch(iter([(tokens, dummy)]), return_logits=True, compute_loss=False,
                                           reduce_output=None, bcast_loss=False, num_micro_batches=1)
            if logits is None:  # not the last stage: placeholder of the right shape, result discarded below
                V = self.cfg.model.vocab_size // self.dims.tp
                logits = torch.zeros(*tokens.shape, V, device=self.device)
            return logits

        per_seq, counts = self.objective.eval_terms(network, x0.to(self.device), time_samples, seed)
        out = torch.stack([per_seq.double(), counts.double()])
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(out, src=last, group=ps.get_pipeline_model_parallel_group())
        return out[0], out[1].long()

