"""Top-1 accuracy on masked tokens, per token and weighted by each token's UTF-8 bytes (the share of the masked text
whose token the top-1 prediction recovers): per token, models of different tokenizers are not comparable.
4 x 8 held-out sequences, each token masked with probability t = 0.05, 0.15, ..., 0.95 in turn; one row per t,
then the mean over t (the figure `unmask eval` reports as accuracy, up to its time draws).

    python bench/top1_by_bytes.py runs/adapt-smollm2-cpu
    python bench/top1_by_bytes.py runs/demo-cpu-bbc
    python bench/top1_by_bytes.py runs/adapt-smollm2-cpu --source "$(python -c \
        'from unmask.eval.genppl import smollm2_path; print(smollm2_path())')" --causal

--source scores the adapted run's source model as imported (its step 0) instead of the run's weights; --causal
gives every query the causal mask, so with --source the figures are the source LM's own next-token accuracy on the
masked tokens (what it reads left of each one), the ceiling of what adaptation keeps from it.

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


def source_model(source: str, cfg):
    """The adapted run's source LM as `--init-from` imports it (before any training), in the run's model layout."""
    from unmask.model.build import build_model
    from unmask.model.hf.init import init_from, with_model
    from unmask.model.hf.lazy import load_into

    state, fields = init_from(source, cfg)
    return load_into(build_model(with_model(cfg, fields).model), state).eval()


def main() -> None:
    from unmask.eval.api import held_out
    from unmask.inference import load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--batches", type=int, default=4, help="held-out batches of 8 sequences")
    p.add_argument("--source", help="score this source LM (the run's --init-from) as imported, not the run")
    p.add_argument("--causal", action="store_true", help="causal attention (left context only)")
    args = p.parse_args()
    loaded = load(args.checkpoint, "cpu")
    model = source_model(args.source, loaded.config) if args.source else loaded.model
    sp = loaded.special
    sizes = token_bytes(loaded.codec, loaded.model_cfg.vocab_size, {sp.pad, sp.bos, sp.eos, sp.mask})
    batches = list(itertools.islice(iter(held_out(loaded, loaded.config.data.val_dir, 8)), args.batches))
    length = batches[0].shape[1]
    attention = torch.ones(length, length, dtype=torch.bool).tril() if args.causal else None
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(4, dtype=torch.float64)  # hits, masked, hit bytes, masked bytes
    print(f"{args.source or args.checkpoint}{' (causal)' if args.causal else ''}")
    for t in [0.05 + 0.1 * i for i in range(10)]:
        row = torch.zeros(4, dtype=torch.float64)
        for x0 in batches:
            m = (torch.rand(x0.shape, generator=g) < t) & (x0 != sp.pad)
            with torch.no_grad():
                logits = model(torch.where(m, sp.mask, x0), attn_mask=attention).float()
            logits[..., sp.mask] = -math.inf
            ok = (logits.argmax(-1) == x0) & m
            row += torch.tensor([ok.sum().item(), m.sum().item(), sizes[x0[ok]].sum(), sizes[x0[m]].sum()])
        print(f"  t = {t:.2f}: top-1 per token {row[0] / row[1]:.3f}, per byte {row[2] / row[3]:.3f}")
        total += row
    print(f"  all t: top-1 per token {total[0] / total[1]:.3f}, per byte {total[2] / total[3]:.3f}, "
          f"{total[3] / total[1]:.2f} bytes per masked token")


if __name__ == "__main__":
    main()
