"""Where over the mask rate t a masked-diffusion model loses its bound: the cross-entropy per masked token on
held-out sequences with each token masked independently with probability t, at a few fixed t (the NELBO under
the linear schedule is the integral of this curve over t in (0, 1], so its mean over evenly spaced t
approximates it). Prints one row per t, and for scale two unigram predictors of the same tokens: their own
frequencies (an oracle: a held-out split of a few documents has its own names) and the training split's (fair).

    python bench/nelbo_by_t.py runs/adapt-smollm2-cpu [--val data/bbc-smollm2/val] [--batches 2]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch


def main() -> None:
    from unmask.eval.api import held_out
    from unmask.inference import load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--val", default=None, help="held-out split (default: the run's data.val_dir)")
    p.add_argument("--batches", type=int, default=2, help="batches of 8 sequences")
    p.add_argument("--t", type=float, nargs="+", default=[0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95])
    p.add_argument("--train-batches", type=int, default=200, help="batches of 8 training sequences for the unigram")
    args = p.parse_args()
    loaded = load(args.checkpoint, "cpu")
    special = loaded.special
    val = args.val or loaded.config.data.val_dir
    batches = list(itertools.islice(iter(held_out(loaded, val, 8)), args.batches))
    tokens = torch.cat([b[b != special.pad] for b in batches])
    freq = torch.bincount(tokens).double() / len(tokens)
    entropy = -float((freq[freq > 0] * freq[freq > 0].log()).sum())
    train = torch.cat([b[b != special.pad] for b in itertools.islice(
        iter(held_out(loaded, loaded.config.data.train_dir, 8)), args.train_batches)])
    counts = torch.bincount(train, minlength=loaded.model_cfg.vocab_size).double() + 0.5  # add-half smoothing
    fair = -float((counts / counts.sum()).log()[tokens].mean())
    print(f"{args.checkpoint}: {len(tokens)} held-out tokens, unigram entropy {entropy:.3f} nats (their own "
          f"frequencies), {fair:.3f} under the training split's ({len(train)} tokens)")
    g = torch.Generator().manual_seed(0)
    curve = []
    for t in args.t:
        total, count = 0.0, 0
        for x0 in batches:
            masked = (torch.rand(x0.shape, generator=g) < t) & (x0 != special.pad)
            with torch.no_grad():
                logits = loaded.model(torch.where(masked, special.mask, x0)).float()
            logits[..., special.mask] = -math.inf
            total += float(torch.nn.functional.cross_entropy(logits[masked], x0[masked], reduction="sum"))
            count += int(masked.sum())
        curve.append(total / count)
        print(f"t = {t:.2f}: {total / count:.3f} nats per masked token ({count} tokens)", flush=True)
    print(f"mean over these t: {sum(curve) / len(curve):.3f} nats/token")


if __name__ == "__main__":
    main()
