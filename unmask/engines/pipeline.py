"""Pipeline parallelism: the plain model cut into DeepSpeed `PipelineModule` stages, each running the model's own
code (`Transformer.embed`, `rope`, `Block.forward`, `head`), so there is no second copy of the forward.

Layers: embedding (+ time embedding), one layer per block, then final norm + output head; blocks are split
evenly over stages (`partition_method="type:_BlockLayer"`), the embedding joins the first stage and the head the
last. Between stages the hidden state [B, L, D] travels, with the time condition [B, cond_dim] beside it as a
tuple when the model is time-conditioned. Noise is a function of BatchKey, so every stage runs
`objective.corrupt` itself: the first stage takes the network inputs, the last stage the targets, and the
objective's `loss_from_logits` is the pipeline loss.

Under block diffusion the stages run its vectorised training pass (`Transformer.forward(x_t, clean=x_0)`): the first
stage takes (x_t, x_0), the hidden state of both side by side [B, 2L, D] travels, every block reads the model's
vectorised layout, and the head keeps the x_t half. Stages only ever train and evaluate, never sample.

The layers keep the attribute names of `Transformer`, so the checkpoint's per-layer keys are the model's
(layer 0: `tok_embeddings.*` / `time_embedding.*`, blocks: `block.*`, last: `norm.*`, `output.*`), which is what
checkpoint readers map back to plain keys.
"""

from __future__ import annotations

import torch
from torch import nn

from unmask.config import Config
from unmask.core.transformer import Transformer
from unmask.diffusion.objective import EvalTerms
from unmask.engines.base import LocalWeights, StepStats, unpack
from unmask.engines.deepspeed import (
    DeepSpeedCheckpointing,
    deepspeed_config,
    ds_local_weights,
    initialize,
    prepare_deepspeed,
    prepare_model,
    step_stats,
)
from unmask.parallel import collective
from unmask.parallel.dims import ParallelDims


def _split(x) -> tuple[torch.Tensor, torch.Tensor | None]:
    return x if isinstance(x, tuple) else (x, None)


def _join(h: torch.Tensor, cond: torch.Tensor | None):
    # DeepSpeed sends tensors between stages, never None: the condition travels only when there is one.
    return h if cond is None else (h, cond)


class _EmbedLayer(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.tok_embeddings, self.time_embedding = model.tok_embeddings, model.time_embedding
        self.block_size = model.block_size

    def forward(self, inputs):
        if self.block_size:  # block diffusion: (x_t, x_0) side by side, no time input
            return Transformer.embed(self, torch.cat(inputs, dim=1))[0]
        tokens, t = _split(inputs)
        return _join(*Transformer.embed(self, tokens, t))  # the model's method on the same attribute names


class _BlockLayer(nn.Module):
    """A block with the rotary tables (and attention mask) of its input's length, so any stage can run it."""

    rope, layout = Transformer.rope, Transformer.layout  # the model's own, on the same attribute names

    def __init__(self, block: nn.Module, model: Transformer):
        super().__init__()
        self.block, self.cfg, self.block_size = block, model.cfg, model.block_size

    def forward(self, x):
        h, cond = _split(x)
        cos, sin, mask = self.layout(h.shape[1], h.device, vectorised=bool(self.block_size))
        return _join(self.block(h, cos, sin, cond, mask=mask), cond)


class _HeadLayer(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.norm, self.output, self.block_size = model.norm, model.output, model.block_size
        self.shift_logits = model.shift_logits  # Transformer.head reads it: the same shifted logits as one process

    def forward(self, x) -> torch.Tensor:
        h = _split(x)[0]
        if self.block_size:  # block diffusion: the logits of the x_t half
            h = h[:, : h.shape[1] // 2]
        return Transformer.head(self, h)


def _plain_names(model: Transformer) -> list:
    """Per pipeline layer, the map from its parameter/module names to the plain model's (seeds, TP plan)."""
    tied = model.cfg.tie_embeddings

    def block(i):
        return lambda n: f"layers.{i}" + n.removeprefix("block")

    def head(n):  # a tied head is the embedding's weight: same name, same seed, same values
        return "tok_embeddings" + n.removeprefix("output") if tied and n.startswith("output") else n

    return [lambda n: n, *(block(i) for i in range(len(model.layers))), head]


def layer_specs(model: Transformer, cfg: Config, dims: ParallelDims, device: torch.device,
                init_state: dict | None) -> list:
    """LayerSpecs over a meta-device model: each stage builds only its own layers, at tensor-parallel shard size,
    filled per parameter as in the one-process build (unmask.model.build.materialize)."""
    from deepspeed.pipe import LayerSpec

    from unmask.model.build import materialize

    class _Spec(LayerSpec):
        def __init__(self, typename, plain_name, *args):
            super().__init__(typename, *args)
            self.plain_name = plain_name

        def build(self, log=False):
            layer = super().build(log)
            if dims.tp > 1:
                from unmask.parallel.tensor import TP_PLAN, apply_tensor_parallel

                apply_tensor_parallel(layer, TP_PLAN, gpu=device.type == "cuda", plain_name=self.plain_name)
            return materialize(layer, device, model.init_parameter, cfg.train.seed, self.plain_name, init_state)

    names = _plain_names(model)
    return [_Spec(_EmbedLayer, names[0], model), *(_Spec(_BlockLayer, names[i + 1], b, model)
                                                   for i, b in enumerate(model.layers)),
            _Spec(_HeadLayer, names[-1], model)]


def build_pipeline_module(model: Transformer, objective, dims: ParallelDims, layers: list | None = None):
    """A PipelineModule over the (possibly tensor-parallel) model, or over `layers` (LayerSpecs, each stage
    building its own), with DeepSpeed's topology laid out as megatron's groups (see parallel/dims.py), so
    tensor-parallel peers are the same ranks in both libraries."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if layers is None:
        layers = [_EmbedLayer(model), *(_BlockLayer(b, model) for b in model.layers), _HeadLayer(model)]
    topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)

    def loss_fn(logits, targets):
        return objective.loss_from_logits(logits, targets).loss

    # dynamic_shape: shapes may change between steps (random-length crops, validation batches).
    return PipelineModule(layers, topology=topology, loss_fn=loss_fn, partition_method="type:_BlockLayer",
                          dynamic_shape=True)


def _network_input(inputs: tuple):
    """The first stage's input: the tokens alone, or (tokens, t) for a time-conditioned model."""
    return inputs[0] if len(inputs) == 1 else tuple(inputs)


class PipelineEngine(DeepSpeedCheckpointing):
    """The Engine interface on a DeepSpeed PipelineEngine (`.ds`)."""

    def __init__(self, cfg: Config, model: Transformer | None, objective, dims: ParallelDims,
                 device: torch.device | None = None, init_state: dict | None = None):
        """`model`: a whole plain model to cut into stages, or None to build only this stage's layers."""
        prepare_deepspeed()
        self.cfg, self.objective, self.dims = cfg, objective, dims
        if model is None:
            from unmask.model.build import build_model

            meta = build_model(cfg.model, causal=cfg.causal, block_size=cfg.block_size, device="meta")
            specs = layer_specs(meta, cfg, dims, device or torch.device("cpu"), init_state)
            module = build_pipeline_module(meta, objective, dims, specs)
            module.tp_applied = True  # each layer was built at shard size
            prepare_model(cfg, module, dims)
        else:
            prepare_model(cfg, model, dims)
            module = build_pipeline_module(model, objective, dims)
        del model
        ds_config = deepspeed_config(cfg, dims)
        # Partitioned stage transfers cache the first shape; dynamic shapes need whole tensors.
        ds_config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
        self.ds, self.optimizer, self.scheduler = initialize(cfg, module, ds_config)
        self.model = self.ds.module
        self.device = self.ds.device

    def local_weights(self) -> LocalWeights:
        """This stage's layers, named "<global layer index>.<name in the layer>" as in its layer files."""
        from megatron.core import parallel_state as ps

        return ds_local_weights(self.ds, pp_stage=ps.get_pipeline_model_parallel_rank())

    def train_step(self, micro_batches, keys) -> StepStats:
        lr = self.scheduler.get_last_lr()[0]
        data = []
        for batch, key in zip(micro_batches, keys, strict=True):
            # Every stage corrupts the same batch with the same key (and prompt mask): the first stage keeps the
            # network inputs, the last the targets, so both see the same masks.
            x0, extra = unpack(batch, self.device)
            c = self.objective.corrupt(x0, key, **extra)
            data.append((_network_input(c.inputs), c.targets))
        # train_batch runs grad_accum micro-batches, steps, and returns the mean loss over them and dp.
        loss = float(self.ds.train_batch(iter(data)))
        return step_stats(self.ds, loss, lr)

    @torch.no_grad()
    def eval_terms(self, x0, time_samples, key):
        """The objective's eval on the pipeline: each network call is one inference pass; only the last stage
        sees logits, so its terms are broadcast to the other stages of its pipeline."""
        from megatron.core import parallel_state as ps

        def network(*inputs, clean=None):
            inputs = inputs if clean is None else (*inputs, clean)  # block diffusion: (x_t, x_0), as in training
            dummy = torch.zeros(1, device=self.device)
            # eval_batch adds the logits to the last training loss it still holds (DeepSpeed 0.19): clear it.
            self.ds.total_loss = None
            _, logits = self.ds.eval_batch(iter([(_network_input(inputs), dummy)]), return_logits=True,
                                           compute_loss=False, reduce_output=None, bcast_loss=False,
                                           num_micro_batches=1)
            if logits is None:  # not the last stage: placeholder of the right shape, result discarded below
                V = self.cfg.model.vocab_size // self.dims.tp
                logits = torch.zeros(*inputs[0].shape, V, device=self.device)
            return logits

        x0, extra = unpack(x0, self.device)
        terms = self.objective.eval_terms(network, x0, time_samples, key, **extra)
        out = torch.stack([terms.nll.double(), terms.tokens.double(), terms.mc_var.double()])
        last = ps.get_pipeline_model_parallel_last_rank()
        collective.broadcast_(out, src=last, group=ps.get_pipeline_model_parallel_group())
        return EvalTerms(out[0], out[1].long(), out[2])
