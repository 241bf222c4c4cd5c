"""Adapted vs from scratch (issue 16's checks): SmolLM2-135M adapted to masked diffusion by `make demo` against the
0.16M-parameter from-scratch demo model (`configs/demo-cpu.toml`, `make demo-scratch`'s recipe) trained on the same
corpus, BBC News, on the held-out text of that corpus.

1. Held-out likelihood, each model on its own tokenization of the same held-out documents (prepare-data's split
   follows each document's digest, not the tokenizer): NELBO per token with its standard error, per UTF-8 byte
   (the comparable figure across tokenizers), and the top-1 accuracy on the masked tokens the NELBO scores.
2. Unconditional samples at temperature 1, one token per step in left-to-right blocks, scored per judge token
   and per byte by two judges: SmolLM2-135M (biased: it judges its own descendant) and an unmask AR baseline
   trained on the demo corpus (`configs/ar-demo-cpu.toml`), beside the same judges' scores of held-out text and of
   that text with its words shuffled. Mean +- standard deviation over seeds.

The from-scratch model and the AR judge are trained here when missing (data/bbc-512: the corpus in a 512-piece
tokenizer, as `make demo-scratch` tokenizes Shakespeare; ~10 minutes for both on 2 cores).

    make demo                             # the adapted run (~35 minutes on 2 cores)
    python bench/adaptation.py            # ~25 minutes the first time
    python bench/adaptation.py --seeds 0 1 2 3 --samples 16

Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spread(values: list[float], fmt: str = ".1f") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):{fmt}} +- {sd:{fmt}}"


SCRATCH_DATA = ROOT / "data/bbc-512"  # the demo corpus with the from-scratch demo's 512-piece tokenizer


def ensure_scratch_data(data: Path) -> None:
    if (data / "train" / "manifest.json").is_file():
        return
    from unmask.data.corpora import fetch_bbc_news

    corpus = fetch_bbc_news(ROOT / "data/corpora")
    cmd = ["unmask", "prepare-data", str(corpus), "--out", str(data), "--vocab-size", "512", "--seq-len", "128",
           "--val-fraction", "0.05", "--no-progress"]
    print("preparing the from-scratch shards:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def ensure_run(config: str, run: Path, data: Path) -> None:
    """Train `config` on `data` into `run` unless it has finished there."""
    if (run / "checkpoints" / "latest").exists():
        return
    cmd = ["unmask", "train", config, f"--data.train_dir={data}/train", f"--data.val_dir={data}/val",
           f"--train.run_dir={run}"]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapted", type=Path, default=ROOT / "runs/adapt-smollm2-cpu")
    p.add_argument("--scratch", type=Path, default=ROOT / "runs/demo-cpu-bbc",
                   help="the from-scratch demo model on the demo corpus (trained here when missing)")
    p.add_argument("--ar-judge", type=Path, default=ROOT / "runs/ar-demo-cpu-bbc",
                   help="the AR judge on the demo corpus (trained here when missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=8, help="samples per seed")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--block-lengths", type=int, nargs="+", default=[1, 4],
                   help="semi-autoregressive block sizes to sample with (1: one token a step, left to right)")
    p.add_argument("--batches", type=int, default=4, help="held-out batches of 8 sequences for the likelihood")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args()
    if not (args.adapted / "checkpoints" / "latest").exists():
        sys.exit(f"{args.adapted}: no finished run there; `make demo` writes runs/adapt-smollm2-cpu")
    ensure_scratch_data(SCRATCH_DATA)
    ensure_run("configs/demo-cpu.toml", args.scratch, SCRATCH_DATA)
    ensure_run("configs/ar-demo-cpu.toml", args.ar_judge, SCRATCH_DATA)

    from unmask.eval.api import likelihood, load_reference, samples_at, text_baselines
    from unmask.eval.genppl import generative_perplexity
    from unmask.inference import load

    models = {"adapted": load(str(args.adapted), "cpu"), "scratch": load(str(args.scratch), "cpu")}
    out: dict = {"likelihood": {}, "samples": {}, "baselines": {}}
    print(f"\n1. held-out likelihood ({args.batches} x 8 sequences of each model's own val split)")
    print(f"{'model':8} {'nats/token':>16} {'bits/byte':>9} {'top-1 acc':>9} {'tokens':>7}")
    for name, loaded in models.items():
        row = likelihood(loaded, loaded.config.data.val_dir, batches=args.batches, batch_size=8)
        out["likelihood"][name] = row
        print(f"{name:8} {row['nats_per_token']:9.3f} +- {row['stderr']:.3f} {row['bits_per_byte']:9.3f} "
              f"{row['accuracy']:9.3f} {row['tokens']:7d}")
    a, s = out["likelihood"]["adapted"], out["likelihood"]["scratch"]
    print(f"adapted / scratch: {a['bits_per_byte'] / s['bits_per_byte']:.2f}x the bits per byte, "
          f"{a['accuracy'] / s['accuracy']:.2f}x the top-1 accuracy (tokens differ: the byte figure is the fair one)")

    print(f"\n2. samples at temperature 1 ({len(args.seeds)} seeds x {args.samples} x {args.length} tokens, one token "
          f"per step, in left-to-right blocks of {args.block_lengths} positions), per judge")
    samples = {f"{name} b{b}": [samples_at(loaded, args.length, None, num_samples=args.samples, length=args.length,
                                           seed=seed, block_length=b, temperature=1.0, keep_texts=True)
                                for seed in args.seeds]
               for name, loaded in models.items() for b in args.block_lengths}
    for judge_name, path in (("SmolLM2-135M", "smollm2"), ("unmask AR (demo corpus)", str(args.ar_judge))):
        judge = load_reference(path)
        base = text_baselines(models["adapted"], models["adapted"].config.data.val_dir, judge,
                              num_samples=args.samples * len(args.seeds), length=args.length)
        rows = {name: [generative_perplexity(r["texts"], judge) for r in got] for name, got in samples.items()}
        out["samples"][judge_name] = {name: [{"gen_ppl": g.perplexity, "gen_bits_per_byte": g.bits_per_byte}
                                             for g in got] for name, got in rows.items()}
        out["baselines"][judge_name] = base
        shuffled = base["shuffled_words"]
        print(f"judge {judge_name}:  {'gen ppl (per judge token)':>26} {'bits/byte':>14} {'entropy':>7} "
              f"{'ppl / shuffled':>14} {'bpb / shuffled':>14}")
        for name, got in rows.items():
            ppl, bpb = [g.perplexity for g in got], [g.bits_per_byte for g in got]
            entropy = statistics.mean(r["unigram_entropy"] for r in samples[name])
            print(f"  {name + ' samples':22} {spread(ppl):>26} {spread(bpb, '.3f'):>14} {entropy:7.2f} "
                  f"{statistics.mean(ppl) / shuffled['gen_ppl']:14.2f} "
                  f"{statistics.mean(bpb) / shuffled['gen_bits_per_byte']:14.2f}")
        for name, row in base.items():
            print(f"  {name.replace('_', ' '):22} {row['gen_ppl']:>26.1f} {row['gen_bits_per_byte']:>14.3f}")
    out["texts"] = {name: [r.pop("texts") for r in got] for name, got in samples.items()}
    for b in args.block_lengths:
        example = out["texts"][f"adapted b{b}"][0][0][:300]
        print(f"example (adapted, blocks of {b}, seed 0): {example!r}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=lambda v: None if isinstance(v, float) and
                                       math.isnan(v) else v))


if __name__ == "__main__":
    main()
