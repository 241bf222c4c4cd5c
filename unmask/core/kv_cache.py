"""Keys and values kept between the forwards of a sampler: `KVCache` (what transformer.Transformer reads through its
`kv` argument), `BlockCache` (Fast-dLLM's approximate prefix/dual cache for block-wise diffusion decoding) and
`FinishedBlocks` (block diffusion's exact cache of the decoded blocks, BD3-LM).

Imports only torch (see unmask.core). Training never builds either: a forward without `kv` is the plain one.
"""

from __future__ import annotations

import torch

KV_CACHES = ("none", "prefix", "dual")


class KVCache:
    """Every layer's keys and values [B, Hkv, L, D] (after rotary, before grouped-query repetition).

    The next forward either
    - appends (`append()`): it sees the positions after the stored ones and adds theirs; from empty this is a full
      forward that fills the cache; exact for a causal model, whose earlier keys never change;
    - splices (`splice(start)`): it sees positions [start, start + n) of a sequence as long as the stored one and
      attends to the stored keys/values with its own fresh ones in their place; approximate for a bidirectional
      model, since the stored ones predate the tokens committed since (Fast-dLLM);
    - extends (`extend(keep)`): like append, but afterwards only positions [0, keep) stay stored; the rest of the
      slice is seen once (block diffusion: the block being decoded attends the finished ones and itself)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mode, self.offset, self.keep = "append", 0, None

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def append(self) -> KVCache:
        self.mode, self.offset, self.keep = "append", self.length, None
        return self

    def extend(self, keep: int) -> KVCache:
        if keep < self.length:
            raise ValueError(f"KVCache.extend(keep={keep}) would drop stored positions (it holds {self.length})")
        self.mode, self.offset, self.keep = "append", self.length, keep
        return self

    def splice(self, start: int) -> KVCache:
        if not self.keys:
            raise ValueError("KVCache.splice needs stored keys: run one full forward with append() first")
        self.mode, self.offset = "splice", start
        return self

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self, i)

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's fresh keys/values of the slice [B, Hkv, n, D] -> the keys/values it attends to."""
        if self.mode == "append":
            if i == len(self.keys):  # first forward: this layer has nothing stored yet
                self.keys.append(k)
                self.values.append(v)
            else:
                self.keys[i] = torch.cat([self.keys[i], k], dim=2)
                self.values[i] = torch.cat([self.values[i], v], dim=2)
            seen = self.keys[i], self.values[i]
            if self.keep is not None:
                self.keys[i], self.values[i] = seen[0][:, :, : self.keep], seen[1][:, :, : self.keep]
            return seen
        # Written in place (Fast-dLLM's replace_position): the span is re-run on every splice, so its stored keys
        # are never read stale, and no copy of the whole cache is made per call.
        a, b = self.offset, self.offset + k.shape[2]
        self.keys[i][:, :, a:b] = k
        self.values[i][:, :, a:b] = v
        return self.keys[i], self.values[i]


class LayerKV:
    """One layer's handle on a KVCache: what transformer.Attention calls."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.index, k, v)


class BlockCache:
    """The network for a sampler that decodes one block at a time, with Fast-dLLM's approximate KV cache
    (`generate_with_prefix_cache` / `generate_with_dual_cache`): the first call of each block (and every `refresh`
    calls after, when refresh > 0) is a full forward that stores every layer's keys/values; the calls between
    re-run only the block ("dual") or the block and everything after it ("prefix") against the stored rest.

    refresh = 1 makes every call a full forward: the uncached sampler exactly, which is what its test checks.
    Called as model(tokens [B, L] (, t [B])) -> (logits [B, n, V] of positions [start, start + n), start)."""

    def __init__(self, model, mode: str, refresh: int):
        self.model, self.mode, self.refresh = model, mode, refresh
        # A shifted model (AR adaptation) reads position i's logits from hidden i-1: a re-run span starts one
        # position early so its first position has its predecessor, whose logits are then dropped.
        self.lead = int(bool(getattr(model, "shift_logits", False)))
        self.span: tuple[int, int] | None = None
        self.since_full: int | None = None  # calls since the last full forward; None: none in this block
        self.kv = KVCache()

    def start_block(self, active: torch.Tensor) -> None:
        """active [B, L] bool: the block's positions. Rows may start their blocks at different columns (prompts of
        different lengths), so the re-run span covers the block of every row."""
        cols = active.any(0).nonzero()[:, 0]
        stop = int(cols[-1]) + 1 if self.mode == "dual" else active.shape[1]
        self.span, self.since_full = (int(cols[0]), stop), None

    def __call__(self, tokens: torch.Tensor, *t: torch.Tensor) -> tuple[torch.Tensor, int]:
        full = self.span is None or self.since_full is None or (self.refresh and self.since_full >= self.refresh)
        if full:
            self.kv = KVCache()
            self.since_full = 1
            return self.model(tokens, *t, kv=self.kv.append()), 0
        start, stop = self.span
        self.since_full += 1
        lead = min(self.lead, start)
        logits = self.model(tokens[:, start - lead:stop], *t, kv=self.kv.splice(start - lead))
        return logits[:, lead:], start


class FinishedBlocks:
    """The network for sampling a block-diffusion model (`block_size` b) block by block with an exact KV cache, as
    BD3-LM samples: each call runs only the blocks that hold the current decoding block of some row, against the
    stored keys/values of the blocks before them, which are final (a block attends only itself and earlier blocks,
    so its keys stop changing once it is decoded). The first call of a decoding block also runs the blocks finished
    since the last store and keeps their keys: no extra network call per block.

    Gives the logits the uncached sampler gets from a full forward over the whole sequence, up to float rounding.
    Called as model(tokens [B, L]) -> (logits [B, n, V] of positions [start, start + n), start)."""

    def __init__(self, model, block_size: int):
        self.model, self.block_size = model, block_size
        self.span: tuple[int, int] | None = None
        self.kv = KVCache()

    def start_block(self, active: torch.Tensor) -> None:
        """active [B, L] bool: the positions decoded next; the span is every model block that holds one."""
        cols = active.any(0).nonzero()[:, 0]
        b = self.block_size
        self.span = (int(cols[0]) // b * b, min(active.shape[1], -(-(int(cols[-1]) + 1) // b) * b))

    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        start, stop = self.span
        stored = self.kv.length  # positions before `start` not stored yet are final: this call stores them
        logits = self.model(tokens[:, stored:stop], kv=self.kv.extend(keep=start))
        return logits[:, start - stored:], start
