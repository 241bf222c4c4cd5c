"""Top-1 accuracy on masked tokens, per token and weighted by each token's UTF-8 bytes (the share of the masked text
whose token the top-1 prediction recovers): per token, models of different tokenizers are not comparable.
4 x 8 held-out sequences, each token masked with probability t = 0.05, 0.15, ..., 0.95 in turn.

    python bench/top1_by_bytes.py runs/adapt-smollm2-cpu
    python bench/top1_by_bytes.py runs/demo-cpu-bbc

Byte lengths: a sentencepiece piece with its word-boundary mark as one space (byte-fallback pieces: 1 byte); a
byte-level BPE token (SmolLM2's) has one character per byte. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch


def token_bytes(codec, vocab_size: int, special: set[int]) -> torch.Tensor:
    """[vocab_size] UTF-8 bytes of each token's text (0 for special tokens)."""
    if codec.path.suffix == ".model":
        import sentencepiece as spm

        proc = spm.SentencePieceProcessor(model_file=str(codec.path))

        def size(i: int) -> int:
            piece = proc.id_to_piece(i)
            return 1 if piece.startswith("<0x") and piece.endswith(">") else len(piece.replace("\u2581", " ").encode())
    else:
        from transformers import PreTrainedTokenizerFast

        file = codec.path if codec.path.suffix == ".json" else codec.path / "tokenizer.json"
        tok = PreTrainedTokenizerFast(tokenizer_file=str(file))

        def size(i: int) -> int:
            return len(tok.convert_ids_to_tokens(i) or "")
    return torch.tensor([0 if i in special else size(i) for i in range(vocab_size)], dtype=torch.float64)


def main() -> None:
    from unmask.eval.api import held_out
    from unmask.inference import load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--batches", type=int, default=4, help="held-out batches of 8 sequences")
    args = p.parse_args()
    loaded = load(args.checkpoint, "cpu")
    sp = loaded.special
    sizes = token_bytes(loaded.codec, loaded.model_cfg.vocab_size, {sp.pad, sp.bos, sp.eos, sp.mask})
    batches = list(itertools.islice(iter(held_out(loaded, loaded.config.data.val_dir, 8)), args.batches))
    g = torch.Generator().manual_seed(0)
    hits = masked = hit_bytes = masked_bytes = 0.0
    for t in [0.05 + 0.1 * i for i in range(10)]:
        for x0 in batches:
            m = (torch.rand(x0.shape, generator=g) < t) & (x0 != sp.pad)
            with torch.no_grad():
                logits = loaded.model(torch.where(m, sp.mask, x0)).float()
            logits[..., sp.mask] = -math.inf
            ok = (logits.argmax(-1) == x0) & m
            hits, masked = hits + ok.sum().item(), masked + m.sum().item()
            hit_bytes, masked_bytes = hit_bytes + sizes[x0[ok]].sum().item(), masked_bytes + sizes[x0[m]].sum().item()
    print(f"{args.checkpoint}: top-1 per token {hits / masked:.3f}, per byte {hit_bytes / masked_bytes:.3f}, "
          f"{masked_bytes / masked:.2f} bytes per masked token")


if __name__ == "__main__":
    main()
