"""Per-rank memory of a parallel layout, from the config alone.

Model states (Rajbhandari et al. 2020, ZeRO): weights, gradients, Adam's two moments and, when weights are
not fp32 or ZeRO >= 1, an fp32 master copy. ZeRO-1 shards optimizer and master over the data-parallel ranks,
ZeRO-2 also gradients, ZeRO-3 also weights. Tensor parallelism divides the projections and the vocabulary,
pipeline parallelism the blocks. DeepSpeed's fp32 ZeRO 1-2 keeps a flat fp32 partition besides the model's
weights (bench/parallel.py measures it), so fp32 runs pay the master copy too; fp32 ZeRO-3 updates its weight
partitions in place (unmask.engines.deepspeed.alias_zero3_fp32_masters) and has none.

Activations (Korthikanti et al. 2022, Sec. 4, counted for unmask's block rather than GPT's): what autograd
saves for backward per token, measured with saved-tensor hooks and checked in tests/distributed:
  per block: residual x, normed h, second residual and normed = 4 d (replicated across tp ranks, no sequence
  parallelism); q, rotated q, attention output and its reshaped copy = 4 d_q; k and rotated k = 2 d_kv; v, or
  with grouped-query attention the repeated k and v = d_kv or 2 d_q; SwiGLU = 4 ffn; plus n_heads + 2 fp32
  scalars (attention log-sum-exp, RMSNorm rstd). Memory-efficient attention keeps no seq x seq matrix.
  head: 3 d, plus the fp32 log-softmax of masked positions (half the tokens on average for masked diffusion,
  all for the autoregressive baseline) over the vocabulary.
Activation checkpointing keeps each block's input (d) and recomputes one block at a time in backward.
Pipeline stage 0 holds up to pp micro-batches in flight (1F1B).

Construction (`build`, `build_peak`): the model is built sharded (meta device, then per parameter), so a rank
holds its own share plus one full tensor in transit; `Memory.peak` is the larger of that and training.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from unmask.config import Config, ModelConfig
from unmask.model.counting import block_params, largest_tensor, param_count, zero3_live_params, zero_bucket

GIB = 2**30
GPU_OVERHEAD = 2 * GIB  # CUDA context, NCCL buffers, allocator fragmentation (a rule of thumb, not measured)


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro: int = 1
    accum: int = 1
    ckpt: bool = False

    @classmethod
    def from_config(cls, cfg: Config, world: int) -> Layout:
        p = cfg.parallel
        return cls(dp=max(world // (p.tp * p.pp), 1), tp=p.tp, pp=p.pp, zero=p.zero_stage,
                   micro=cfg.train.micro_batch_size, accum=cfg.train.grad_accum, ckpt=p.activation_checkpointing)


@dataclass
class Memory:
    """Bytes on the heaviest rank. `activations` are saved for backward; `logits` is the loss's transient peak;
    `buffers` are DeepSpeed's communication buckets and ZeRO-3's gathered weights."""

    params: float
    grads: float
    master: float
    optimizer: float
    activations: float
    logits: float = 0.0
    buffers: float = 0.0
    overhead: float = 0.0
    build: float = 0.0  # construction's peak (not part of total: it is over before training starts)

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.master + self.optimizer

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "build")

    @property
    def peak(self) -> float:
        """The most this rank ever holds: training, or construction if that is higher."""
        return max(self.total, self.build + self.overhead)


def build_peak(m: ModelConfig, layout: Layout) -> float:
    """Bytes while building (unmask.model.build.materialize): this rank's share in fp32 (ZeRO-3: its partition,
    built under deepspeed.zero.Init) plus one full fp32 tensor in transit (a tensor-parallel weight drawn whole
    before its slice is kept; under ZeRO-3 the one parameter gathered to be filled)."""
    share = rank_params(m, layout.tp, layout.pp) * 4 / (layout.dp if layout.zero == 3 else 1)
    return share + largest_tensor(m) * 4


def rank_params(m: ModelConfig, tp: int, pp: int) -> int:
    """Parameters on the heaviest rank: its blocks' projections / tp (norms replicated), plus the embedding or
    the output head / tp (both on one stage when pp = 1; a tied head sits on the first and last stages)."""
    norms = 2 * m.dim
    blocks = m.n_layers // pp * ((block_params(m) - norms) // tp + norms)
    table = m.vocab_size * m.dim // tp
    heads = table * (1 if m.tie_embeddings or pp > 1 else 2)
    other = param_count(m) - m.vocab_size * m.dim * (1 if m.tie_embeddings else 2) - m.n_layers * block_params(m)
    return blocks + heads + other  # other: final norm, time embedding


def block_activation_elems(m: ModelConfig, tp: int) -> tuple[float, float]:
    """(elements in the activation dtype, fp32 elements) saved per token by one block on one tp rank."""
    dq, dkv = m.n_heads * m.head_dim // tp, m.kv_heads * m.head_dim // tp
    v = 2 * dq if m.kv_heads < m.n_heads else dkv
    return 4 * m.dim + 4 * dq + 2 * dkv + v + 4 * m.ffn_dim / tp, m.n_heads / tp + 2


def estimate(cfg: Config, layout: Layout, seq_len: int | None = None, gpu: bool = True) -> Memory:
    """Per-rank memory of training `cfg.model` with `layout` (cfg's own dtype and objective)."""
    m, L = cfg.model, layout
    s = seq_len or cfg.train.seq_len
    bf16 = cfg.train.dtype == "bf16"
    w = 2 if bf16 else 4
    P = rank_params(m, L.tp, L.pp)
    N = L.dp
    params = P * w / (N if L.zero == 3 else 1)
    grads = P * w / (N if L.zero >= 2 else 1)
    master = P * 4 / (N if L.zero >= 1 else 1) if bf16 or L.zero in (1, 2) else 0.0
    optimizer = P * 8 / (N if L.zero >= 1 else 1)

    tokens = L.micro * s
    act, fp32 = block_activation_elems(m, L.tp)
    block = cfg.network_streams * tokens * (act * w + fp32 * 4)  # block diffusion: x_t and x_0 through every block
    layers = m.n_layers // L.pp
    in_flight = min(L.pp, L.accum)
    kept = cfg.network_streams * tokens * m.dim * w if L.ckpt else block  # per block and micro-batch
    duo = cfg.diffusion.objective == "duo"
    # Expected scored fraction: masked positions, t ~ U(0, 1]; the AR and uniform-state losses score every one.
    masked = 1.0 if cfg.diffusion.objective in ("ar", "duo") else 0.5
    # Saved per scored logit: fp32 for the masked loss; the uniform-state loss's float64 softmax and xbar besides.
    head = tokens * (3 * m.dim * w + masked * m.vocab_size / L.tp * (20 if duo else 4))
    # Duo's curriculum: the first stage keeps each in-flight micro-batch's soft input [B, L, V] (fp32, the whole
    # vocabulary on every tensor-parallel rank) for the embedding's backward.
    soft = tokens * m.vocab_size * 4 * in_flight if duo and cfg.diffusion.curriculum_end else 0.0
    first = layers * in_flight * kept + (block if L.ckpt else 0) + soft
    last = layers * kept + (block if L.ckpt else 0) + head + (soft if L.pp == 1 else 0.0)
    activations = max(first, last)
    # The loss's transient: full logits, then the masked rows gathered, cast to fp32 and cloned; the uniform-state
    # loss instead keeps float64 logits, softmax, xbar and log xbar of every row.
    logits = tokens * m.vocab_size / L.tp * (w + (32 if duo else masked * (w + 8)))

    buffers = 0.0
    bucket = zero_bucket(m)
    if L.zero in (1, 2):
        buffers = min(bucket, P) * w
    elif L.zero == 3:  # the live (gathered, prefetched) parameters and the reduce bucket
        buffers = (min(zero3_live_params(m), P) + min(bucket, P)) * w
    return Memory(params, grads, master, optimizer, activations, logits, buffers, GPU_OVERHEAD if gpu else 0.0,
                  build_peak(m, L))
