"""Special token ids shared by the tokenizer, the shards' manifest, the objective and the samplers."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens. unmask's own tokenizers use these defaults; imported models
    (BERT/RoBERTa) bring their own, so nothing may hard-code them."""

    pad: int = 0
    unk: int = 1
    bos: int = 2
    eos: int = 3
    mask: int = 4

    PIECES = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>", "mask": "<mask>"}

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> SpecialTokens:
        return cls(**{k: int(d[k]) for k in ("pad", "unk", "bos", "eos", "mask")})
