"""The BERT/RoBERTa encoder family (`model.arch = "bert"`), so an imported masked LM computes exactly what it
computed in its own library before unmask trains it with the masked-diffusion objective.

Architecture choices (those of BERT, all different from unmask's default blocks):
- learned absolute positions added to the token embeddings, then LayerNorm (BERT's token-type-0 vector and
  RoBERTa's position offset are folded into the position table by the importer);
- post-norm blocks: x = LN(x + attention(x)), x = LN(x + ffn(x)); biases everywhere; GELU (erf) MLP;
- MLM head: dense -> GELU -> LayerNorm -> vocabulary projection with a bias (tied to the embedding or not).

This file imports only torch and reads its config by attribute (dim, n_heads, ...), as transformer.py does:
unmask builds it from its ModelConfig, and the Hugging Face export copies it unchanged. Projection names
(wq..wo, w1, w2) follow unmask's blocks. The MLM transform is the module `head` (its keys are in every bert
checkpoint), so unlike `Transformer` this model has no `head(h)` method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BertAttention(nn.Module):
    def __init__(self, cfg, causal: bool = False):
        super().__init__()
        self.head_dim, self.causal = cfg.dim // cfg.n_heads, causal
        self.wq = nn.Linear(cfg.dim, cfg.dim)
        self.wk = nn.Linear(cfg.dim, cfg.dim)
        self.wv = nn.Linear(cfg.dim, cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (w(x).view(B, L, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, H, L, D]
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class BertFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)  # up
        self.w2 = nn.Linear(hidden, dim)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class BertBlock(nn.Module):
    def __init__(self, cfg, causal: bool = False):
        super().__init__()
        self.attention = BertAttention(cfg, causal)
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = BertFeedForward(cfg.dim, cfg.ffn_dim)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x))
        return self.ffn_norm(x + self.feed_forward(x))


class BertHead(nn.Module):
    """The MLM transform before the vocabulary projection."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


class BertTransformer(nn.Module):
    """The plain (rank-free) model for arch="bert": tokens [B, L] -> logits [B, L, V], like `Transformer`."""

    def __init__(self, cfg, causal: bool = False):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.emb_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(BertBlock(cfg, causal) for _ in range(cfg.n_layers))
        self.head = BertHead(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def embed(self, tokens: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """LN(token + position) for tokens [B, L] -> (hidden [B, L, D], None); positions 0..L-1 of the
        (offset-folded) table. t is ignored (BERT has no time input); the pair matches `Transformer.embed`."""
        L = tokens.shape[1]
        if L > self.pos_embeddings.num_embeddings:
            raise ValueError(f"sequence length {L} exceeds the {self.pos_embeddings.num_embeddings} learned positions")
        return self.emb_norm(self.tok_embeddings(tokens) + self.pos_embeddings.weight[:L]), None

    def forward(self, tokens: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        h, _ = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.head(h))

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """BERT's init for parameter `name` on its full-size `tensor`: normal(init_std) weights, zero biases,
        LayerNorm (1, 0), drawn from `generator` (sharded builds call it one parameter at a time, as
        `Transformer.init_parameter`; `init_weights` with torch's global RNG)."""
        if name.endswith(".bias"):
            tensor.zero_()
        elif name.rpartition(".")[0].endswith("norm"):  # emb_norm, attention_norm, ffn_norm, head.norm
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, self.cfg.init_std, generator=generator)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every parameter by `init_parameter` (a tied output weight is the embedding, filled once)."""
        if self.cfg.tie_embeddings:  # to_empty from the meta device gives each use its own tensor: tie again
            self.output.weight = self.tok_embeddings.weight
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

