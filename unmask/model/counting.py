"""Parameter count and training FLOPs per token, from the config alone (no model needed).

Used by the planner and MFU; tests check both against an instantiated model and FlopCounterMode.
"""

from __future__ import annotations

from unmask.config import ModelConfig


def block_params(cfg: ModelConfig) -> int:
    attn = cfg.dim * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim
    mlp = 3 * cfg.dim * cfg.ffn_dim
    norms = 2 * cfg.dim
    adaln = (cfg.cond_dim + 1) * 6 * cfg.dim if cfg.time_conditioning else 0
    return attn + mlp + norms + adaln


def param_count(cfg: ModelConfig) -> int:
    """Every trainable parameter (a tied output projection counted once)."""
    embed = cfg.vocab_size * cfg.dim
    output = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    time = (256 + 1) * cfg.cond_dim + (cfg.cond_dim + 1) * cfg.cond_dim if cfg.time_conditioning else 0
    return embed + output + time + cfg.n_layers * block_params(cfg) + cfg.dim


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: blocks' projections and the output head.

    The embedding lookup and the norms do no matmul; the per-sample time MLP is negligible."""
    per_block = cfg.dim * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim
    per_block += 3 * cfg.dim * cfg.ffn_dim
    return cfg.n_layers * per_block + cfg.vocab_size * cfg.dim


def train_flops_per_token(cfg: ModelConfig, seq_len: int, streams: int = 1) -> int:
    """Forward + backward FLOPs per token: 6 * matmul params + attention scores and values.

    Attention per layer per token: QK^T and AV are 2 * 2 * seq_len * (n_heads * head_dim) forward,
    times 3 for forward + backward = 12 * seq_len * n_heads * head_dim (PaLM / Megatron counting; full
    attention is counted for causal models too, as Megatron and torchtitan do).
    streams: network positions per data token, 2 for block diffusion's [x_t | x_0] pass: its blocks run on 2L
    positions attending over 2L (the dense masked attention SDPA computes), its head on the L of x_t."""
    head = cfg.vocab_size * cfg.dim
    attention = 12 * cfg.n_layers * streams * seq_len * cfg.n_heads * cfg.head_dim
    return 6 * (streams * (matmul_params(cfg) - head) + head) + streams * attention


DS_BUCKET = 5e8  # DeepSpeed's default reduce/allgather bucket, in elements


def zero_bucket(m: ModelConfig) -> int:
    """Elements in each of DeepSpeed's ZeRO reduce and all-gather buckets and ZeRO-3's optimizer sub-groups, as
    unmask's DeepSpeed config sets them: one block's worth (a rank holds its share plus one layer in transit), at
    most DeepSpeed's default. The defaults (5e8 reduce, 1e9 live) keep a small model gathered whole and cost a
    350m-parameter run 2-3x its ZeRO-3 share."""
    return int(min(DS_BUCKET, max(block_params(m), largest_tensor(m))))


def zero3_live_params(m: ModelConfig) -> int:
    """Elements ZeRO-3 may keep gathered (its prefetch bucket and live-parameter cap): two blocks, so the next
    block's all-gather overlaps this block's compute (FSDP's one-layer prefetch), at most DeepSpeed's default."""
    return int(min(DS_BUCKET, max(2 * block_params(m), largest_tensor(m))))


def largest_tensor(m: ModelConfig) -> int:
    """Elements of the model's largest full parameter (the one in transit during a sharded build)."""
    return max(m.vocab_size * m.dim, m.ffn_dim * m.dim, m.n_heads * m.head_dim * m.dim, 6 * m.dim * m.cond_dim)
