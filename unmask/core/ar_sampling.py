"""Left-to-right decoding of a causal model (the autoregressive baseline), so that `unmask sample` times diffusion
and AR generation with one tool: `generate_ar(model, template, options, mask_id, eos_id, pad_id)`.

Each `<mask>` of the template is drawn from the model's prediction at the position before it; fixed tokens are kept
(and read by later positions). kv_cache "prefix" runs each new position alone against every layer's stored keys and
values (exact for a causal model: earlier keys never change); "none" re-runs the whole prefix for every token.
Both draw their noise through the same `choose_tokens` calls in the same order, so they give the same tokens for
the same seed. Imports only torch and its siblings (see unmask.core).
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .sampling_steps import choose_tokens, cut_at_eos, first_eos


def next_logits(model, x: torch.Tensor, i: int, kv: KVCache | None) -> torch.Tensor:
    """Logits [B, V] for position i from positions [0, i): one new position when the cache holds the rest."""
    if kv is None:
        return model(x[:, :i])[:, -1]
    return model(x[:, kv.length:i], kv=kv.append())[:, -1]  # the first call fills the cache with the whole prompt


@torch.no_grad()
def generate_ar(model, template: torch.Tensor, options, mask_id: int, eos_id: int,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Fill every `<mask>` of `template` [B, L] left to right. Returns what sampling.generate does: (tokens [B, L],
    lengths [B], network evaluations, steps), one step and one evaluation per position from the first mask on."""
    o = options
    generated = template == mask_id  # [B, L]
    first = int(generated.long().argmax(1).min())  # the first column any row generates
    generator = torch.Generator(device=template.device).manual_seed(o.seed)
    kv = KVCache() if o.kv_cache == "prefix" else None
    x, nfe = template.clone(), 0
    for i in range(first, x.shape[1]):
        logits = next_logits(model, x, i, kv).double()  # [B, V]
        nfe += 1
        fill = x[:, i] == mask_id  # [B]
        if fill.any():
            chosen = logits[fill]
            chosen[:, mask_id] = float("-inf")  # <mask> is never a token to emit
            x[fill, i], _ = choose_tokens(chosen, o.temperature, o.top_k, o.top_p, generator)
        if o.stop_at_eos and bool((first_eos(x, generated, eos_id) <= i).all()):
            break  # every row has ended: the rest would be cut off
    x = x.masked_fill(x == mask_id, pad_id)  # positions never reached (stopped at <eos>)
    lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
    if o.stop_at_eos:
        x, lengths = cut_at_eos(x, generated, eos_id, pad_id)
    return x, lengths, nfe, nfe
