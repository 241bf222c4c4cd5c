"""Building sampler templates: prompts followed by masks, and infilling templates with `<mask>` spans.

A text template such as "The <mask:8> sat on the <mask>." is split by `split_mask_spans` into text and
span lengths; the caller encodes the text pieces with its tokenizer and `infill_template` lays them out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplingError

MASK_SPAN = re.compile(r"<mask(?::(\d+))?>")


def split_mask_spans(text: str, default_span: int) -> list[str | int]:
    """"a <mask:3> b <mask>" -> ["a ", 3, " b ", default_span]: text pieces and mask-span lengths."""
    pieces: list[str | int] = []
    pos = 0
    for m in MASK_SPAN.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos:m.start()])
        span = int(m.group(1)) if m.group(1) is not None else default_span
        if span < 1:
            raise SamplingError(f"template {text!r}: {m.group(0)} asks for {span} tokens; spans need at least 1")
        pieces.append(span)
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces


def prompt_template(prompts: Sequence[Sequence[int]], length: int, special: SpecialTokens,
                    bos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt (token ids) then masks up to `length`: (template [B, length], prompt_mask [B, length])."""
    rows = []
    for i, prompt in enumerate(prompts):
        prefix = ([special.bos] if bos else []) + [int(t) for t in prompt]
        if len(prefix) >= length:
            raise SamplingError(f"prompt {i} has {len(prefix)} tokens{' with <bos>' if bos else ''} but the "
                                f"sequence length is {length}: nothing is left to generate; raise the length "
                                "or shorten the prompt")
        rows.append(prefix + [special.mask] * (length - len(prefix)))
    template = torch.tensor(rows, dtype=torch.long)
    return template, template != special.mask


def infill_template(rows: Sequence[Sequence[Sequence[int] | int]], special: SpecialTokens,
                    length: int | None = None, bos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of segments (token ids kept as they are, or an int: that many masks) -> (template, prompt_mask).

    Shorter rows are right-padded with <pad> (never generated) to `length`, or to the longest row."""
    flat = []
    for i, segments in enumerate(rows):
        row = [special.bos] if bos else []
        for seg in segments:
            row += [special.mask] * seg if isinstance(seg, int) else [int(t) for t in seg]
        if special.mask not in row:
            raise SamplingError(f"infill template {i} has no <mask> span: add <mask> or <mask:N> where text "
                                "should be generated")
        flat.append(row)
    longest = max(len(r) for r in flat)
    length = longest if length is None else length
    if longest > length:
        raise SamplingError(f"an infill template has {longest} tokens, more than the sequence length {length}")
    template = torch.tensor([r + [special.pad] * (length - len(r)) for r in flat], dtype=torch.long)
    return template, (template != special.mask) & (template != special.pad)
