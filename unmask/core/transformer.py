"""The unmask backbone: a plain-PyTorch bidirectional transformer mapping tokens (and optionally t) to logits.

Architecture choices:
- pre-norm blocks with RMSNorm, no biases in projections (Llama/LLaDA) except optional q/k/v biases (Qwen2);
- rotary position embeddings on queries and keys;
- SwiGLU feed-forward;
- attention through `scaled_dot_product_attention`, non-causal by default; `causal=True` gives the
  autoregressive baseline with the same weights layout; `block_size=b` gives block diffusion (BD3-LM): attention
  is bidirectional inside each block of b positions and causal across blocks, and `forward(x_t, clean=x_0)` runs
  the paper's vectorised training pass over the noised and clean sequences side by side;
- grouped-query attention when n_kv_heads < n_heads;
- optional tied input/output embeddings;
- optional adaLN-zero time conditioning (MDLM's DiT); off by default, as in LLaDA, since masked
  diffusion needs no time input (the mask count carries it);
- optional shifted logits (`shift_logits`, AR -> diffusion adaptation as in Dream/DiffuLLaMA): the logits of
  position i come from hidden state i-1, so an imported causal LM's head keeps predicting the next token; position 0
  reads its own (Dream's cat([logits[:, :1], logits[:, :-1]])). Applied here, in `head`, rather than outside the
  network as Dream does: the objective, every sampler, eval, the pipeline's head stage and the export then read the
  same logits with no second copy of the rule;
- an optional attention mask for training (`attn_mask`, [L, L] bool shared by the batch), which the adaptation
  objective anneals from causal to full (DiffuLLaMA); the network knows nothing of the schedule;
- an optional `kv` cache argument (kv_cache.KVCache) for the samplers: a forward of a slice of the positions
  attends to keys/values kept from earlier forwards. Training never passes one; without it the forward is the
  plain one.

The model knows nothing about ranks or the objective: parallelism replaces its Linear/Embedding
modules from outside (unmask.parallel), and the `<mask>` handling lives in the objective and the samplers.
Projections are separate modules (wq, wk, wv, w1, w3) so tensor parallelism can shard each one.

This file imports only torch and reads its config by attribute (dim, n_layers, n_heads, kv_heads, head_dim,
ffn_dim, vocab_size, max_seq_len, rope_theta, norm_eps, time_conditioning, cond_dim, init_std, tie_embeddings,
qkv_bias and shift_logits (read with getattr, default False: exports written before them lack them)):
unmask passes its ModelConfig, the exported model its UnmaskConfig, and the export copies this file unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rotary_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim/2] in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) (the GPT-NeoX/Llama-HF layout). x: [B, H, L, D]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]  # [1, 1, L, D/2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg, causal: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.causal = causal
        bias = getattr(cfg, "qkv_bias", False)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """kv: one layer's view of a kv_cache.KVCache, which stores or splices in this slice's keys/values.
        mask: [L, Lk] bool, True where a query may attend a key (block diffusion); None: the model's own rule."""
        B, L, _ = x.shape
        # Head counts come from the projection widths so a tensor-parallel shard works unchanged.
        q = self.wq(x).view(B, L, -1, self.head_dim).transpose(1, 2)  # [B, Hq, L, D]
        k = self.wk(x).view(B, L, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        v = self.wv(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)  # [B, Hkv, Lk, D]: every position this slice attends to
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if mask is None:
            mask = self.causal_mask(L, k.shape[2], x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             is_causal=self.causal and mask is None)  # [B, Hq, L, D]
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))

    def causal_mask(self, lq: int, lk: int, device) -> torch.Tensor | None:
        """For queries that are the last lq of lk keys (cached causal decoding): SDPA's is_causal aligns the mask
        top-left, which would hide the cached keys from the new queries."""
        if not self.causal or lq == lk:
            return None
        return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg, causal: bool):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, causal)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        # adaLN-zero: shift/scale/gate for both sublayers from the time embedding.
        self.adaln = nn.Linear(cfg.cond_dim, 6 * cfg.dim) if cfg.time_conditioning else None

    def forward(self, x, cos, sin, cond: torch.Tensor | None = None, kv=None, mask=None) -> torch.Tensor:
        if self.adaln is None:
            x = x + self.attention(self.attention_norm(x), cos, sin, kv, mask)
            return x + self.feed_forward(self.ffn_norm(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(cond)[:, None].chunk(6, dim=-1)
        h = self.attention_norm(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attention(h, cos, sin, kv, mask)
        h = self.ffn_norm(x) * (1 + scale2) + shift2
        return x + gate2 * self.feed_forward(h)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] -> MLP -> [B, cond_dim] (DiT's TimestepEmbedder)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def block_causal_mask(offset: int, length: int, block_size: int, device) -> torch.Tensor:
    """Block diffusion over one sequence: queries at positions [offset, offset + length) attend every key in
    [0, offset + length) whose block is not after theirs. [length, offset + length] bool."""
    q_block = torch.arange(offset, offset + length, device=device) // block_size
    k_block = torch.arange(offset + length, device=device) // block_size
    return k_block[None] <= q_block[:, None]


def vectorised_block_mask(length: int, block_size: int, device) -> torch.Tensor:
    """BD3-LM's training mask over [x_t | x_0] (bd3lms `block_diff_mask`), [2 length, 2 length] bool: a noised block
    attends itself (block-diagonal) and the clean blocks before it (offset block-causal); a clean block attends the
    clean blocks up to its own (block-causal), so its keys are those the sampler caches once the block is decoded."""
    block = (torch.arange(length, device=device) // block_size).repeat(2)  # [2L]
    noised = torch.arange(2 * length, device=device) < length  # [2L]: the x_t half
    bq, bk, nq, nk = block[:, None], block[None], noised[:, None], noised[None]
    diagonal = (bq == bk) & (nq == nk)
    offset_causal = (bq > bk) & nq & ~nk
    causal = (bq >= bk) & ~nq & ~nk
    return diagonal | offset_causal | causal


class TokenEmbedding(nn.Embedding):
    """The token embedding, which also reads a distribution over tokens: Duo's curriculum feeds the network soft
    inputs [B, L, V] (probabilities), embedded as probs @ weight (s-sahoo/duo `models/dit.py` EmbeddingLayer). The
    dispatch is in forward so hooks on the module call (ZeRO-3's parameter gather) run for both kinds of input;
    tensor parallelism overrides `probabilities` (unmask.parallel.tensor)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.probabilities(tokens) if tokens.is_floating_point() else super().forward(tokens)

    def probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., V] -> [..., D]: the expected embedding under `probs`."""
        return probs.to(self.weight.dtype) @ self.weight


class Transformer(nn.Module):
    supports_kv_cache = True  # the samplers' KV caches need the `kv` argument of forward

    def __init__(self, cfg, causal: bool = False, block_size: int = 0):
        """causal: the autoregressive baseline; block_size > 0: block diffusion (BD3-LM); neither: full attention."""
        super().__init__()
        if causal and block_size:
            raise ValueError("a model is either causal or block-causal (block diffusion), not both")
        self.cfg, self.causal, self.block_size = cfg, causal, block_size
        self.shift_logits = bool(getattr(cfg, "shift_logits", False))
        if self.shift_logits and (causal or block_size):
            raise ValueError("shift_logits reads a masked-diffusion model's head one position late (AR adaptation); "
                             "a causal or block-diffusion model reads it unshifted: build it with causal=False and "
                             "block_size=0, or set shift_logits=False")
        self.tok_embeddings = TokenEmbedding(cfg.vocab_size, cfg.dim)
        self.time_embedding = TimeEmbedding(cfg.cond_dim) if cfg.time_conditioning else None
        self.layers = nn.ModuleList(Block(cfg, causal) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    # The pieces below are what the plain forward and the pipeline stages both run (no second copy of the math).
    def embed(self, tokens: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, L] int64, or probabilities over tokens [B, L, V] float (Duo's curriculum) (, t [B]) ->
        (hidden [B, L, D], time condition [B, cond_dim] or None)."""
        cond = None
        if self.time_embedding is not None:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t ([batch] in [0, 1])")
            cond = F.silu(self.time_embedding(t))
        return self.tok_embeddings(tokens), cond

    def rope(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables for `length` positions, computed in fp32 on the fly (cheap next to the blocks, and no
        buffer for a bf16 cast or a meta-device build to spoil)."""
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len {self.cfg.max_seq_len}")
        return rotary_tables(self.cfg.head_dim, length, self.cfg.rope_theta, device=device)

    def layout(self, length: int, device, offset: int = 0, vectorised: bool = False):
        """(cos, sin, attention mask or None) for hidden states of `length` positions starting at `offset`, or, when
        `vectorised`, for block diffusion's [x_t | x_0] pair of length/2 positions each (both at positions 0..)."""
        if vectorised:
            cos, sin = self.rope(length // 2, device)
            return cos.repeat(2, 1), sin.repeat(2, 1), vectorised_block_mask(length // 2, self.block_size, device)
        cos, sin = self.rope(offset + length, device)
        mask = block_causal_mask(offset, length, self.block_size, device) if self.block_size else None
        return cos[offset:], sin[offset:], mask

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and vocabulary projection: [B, L, D] -> logits [B, L, V]; under `shift_logits` the logits of
        position i are hidden i-1's (position 0 keeps its own). A slice that starts past position 0 (a KV-cached
        forward) has no hidden state before its first position: its first logits are its own, and callers that
        need them run one position earlier (kv_cache.BlockCache does)."""
        logits = self.output(self.norm(h))
        if getattr(self, "shift_logits", False):  # getattr: the pipeline's head stage borrows this method
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def forward(self, tokens: torch.Tensor, t: torch.Tensor | None = None, kv=None,
                clean: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [B, L] int64 (or [B, L, V] probabilities, `embed`), t: [B] in [0, 1] (used only with time
        conditioning) -> logits [B, L, V].

        kv (kv_cache.KVCache, samplers only): tokens are positions [kv.offset, kv.offset + L) of a longer sequence
        whose other positions' keys/values the cache holds.
        clean (block diffusion's training pass): the clean tokens x_0 [B, L] of the noised `tokens`; the network
        runs on both side by side and returns the logits of `tokens`.
        attn_mask (training only): [L, L] bool, True where a query may attend a key, for every sample of the batch;
        it replaces the model's own full attention (the adaptation objective's annealed mask)."""
        if attn_mask is not None and (kv is not None or clean is not None or self.causal or self.block_size):
            raise ValueError("attn_mask replaces a full-attention model's mask in a plain training forward; this call "
                             "has a KV cache, clean tokens or a causal/block model: pass attn_mask=None")
        if clean is not None:
            if not self.block_size:
                raise ValueError("clean= is block diffusion's training pass: build the model with block_size > 0")
            h, cond = self.embed(torch.cat([tokens, clean], dim=1), t)
            cos, sin, mask = self.layout(h.shape[1], h.device, vectorised=True)
            for layer in self.layers:
                h = layer(h, cos, sin, cond, mask=mask)
            return self.head(h[:, : tokens.shape[1]])
        h, cond = self.embed(tokens, t)
        cos, sin, mask = self.layout(h.shape[1], h.device, offset=0 if kv is None else kv.offset)
        mask = mask if attn_mask is None else attn_mask
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cond, None if kv is None else kv.layer(i), mask)
        return self.head(h)

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill `tensor`, the full-size value of parameter `name` (a key of `named_parameters()`), by the same rules
        as `init_weights`, from `generator`. Sharded builds call it one parameter at a time and keep their slice."""
        cfg = self.cfg
        module = name.rpartition(".")[0]
        if name.endswith(".bias") or ".adaln." in f".{module}.":  # adaLN-zero: every block starts as the identity
            tensor.zero_()
        elif module.endswith("norm"):
            tensor.fill_(1.0)
        else:  # residual-branch outputs get std / sqrt(2 * n_layers), as in init_weights
            std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if module.endswith(("wo", "w2")) else cfg.init_std
            tensor.normal_(0.0, std, generator=generator)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place (after `to_empty` from the meta device)."""
        cfg = self.cfg
        # Residual-branch outputs get std / sqrt(2 * n_layers) (GPT-2/Megatron scaled init).
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=cfg.init_std)
            elif isinstance(module, nn.Linear):
                std = out_std if name.endswith(("wo", "w2")) else cfg.init_std
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in self.layers:
            if layer.adaln is not None:  # adaLN-zero: every block starts as the identity
                nn.init.zeros_(layer.adaln.weight)
                nn.init.zeros_(layer.adaln.bias)
        if cfg.tie_embeddings:  # the output re-uses the embedding; keep its init
            self.output.weight = self.tok_embeddings.weight

