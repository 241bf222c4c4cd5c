"""Generation side by side (issue 17 item 5): tokens/s, NFE and generative perplexity under one judge for AR with its
KV cache, MDLM ancestral, MDLM threshold decoding with and without Fast-dLLM's cache, block diffusion with its exact
KV cache at two block sizes, and the SDTT-distilled student at 8 and 16 steps, all trained on the same data.

Models: the `tiny` size on BBC News (vocabulary 1024, 128-token rows), 3000 steps x 16 x 128 tokens each, seed 0:
bench/mdm_vs_ar.py's AR and MDLM runs (`runs/bench-mdm-vs-ar/runs/{ar,mdlm}-base-s0-3000`), block diffusion at
block sizes 4 and 16 trained here with the same settings, and a student distilled here from the MDLM run
(SDTT, 256 -> 8 steps, 5 rounds x 400 steps). Runs that exist are read back, not redone.

Every row samples `--samples` unconditional sequences of 128 positions (<bos> then 127 generated) in one batch, per
seed; tokens/s is generated tokens over the sampling wall time (one thread, after a warm-up), generative perplexity
is SmolLM2-135M's (the eval extra) on the decoded texts, beside the samples' unigram entropy (bits; a sampler that
repeats itself scores a low perplexity and a low entropy). Figures are mean +- standard deviation over the seeds.

    python bench/generation.py                 # trains what is missing (~40 min on 2 cores), then the table
    python bench/generation.py --seeds 0 1 2 --samples 32

Prints figures and ratios; asserts nothing on time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mdm_vs_ar import BASE, ROOT, final_validation, prepare  # noqa: E402

LENGTH = 128
# name -> (run, sampler knobs); "steps" is ignored by threshold and ar (they take as many steps as they need)
ROWS: dict[str, tuple[str, dict]] = {
    "AR, KV cache": ("ar", dict(sampler="ar", kv_cache="prefix", steps=1)),
    "MDLM ancestral 1024 steps": ("mdlm", dict(steps=1024)),
    "MDLM ancestral 128 steps": ("mdlm", dict(steps=128)),
    "MDLM threshold 0.9, blocks of 32": ("mdlm", dict(sampler="threshold", block_length=32, steps=1)),
    "MDLM threshold 0.9, blocks of 32, dual cache": ("mdlm", dict(sampler="threshold", block_length=32,
                                                                  kv_cache="dual", steps=1)),
    "BD3 b16 ancestral 1024 steps": ("bd3-16", dict(steps=1024)),
    "BD3 b16 ancestral 128 steps, KV cache": ("bd3-16", dict(steps=128, kv_cache="prefix")),
    "BD3 b16 threshold 0.9, KV cache": ("bd3-16", dict(sampler="threshold", kv_cache="prefix", steps=1)),
    "BD3 b4 ancestral 1024 steps": ("bd3-4", dict(steps=1024)),
    "BD3 b4 ancestral 128 steps, KV cache": ("bd3-4", dict(steps=128, kv_cache="prefix")),
    "BD3 b4 threshold 0.9, KV cache": ("bd3-4", dict(sampler="threshold", kv_cache="prefix", steps=1)),
    "SDTT student 16 steps": ("student", dict(steps=16)),
    "SDTT student 8 steps": ("student", dict(steps=8)),
}
OWN_REFERENCE = {"mdlm": "MDLM ancestral 1024 steps", "student": "MDLM ancestral 1024 steps",
                 "bd3-16": "BD3 b16 ancestral 1024 steps", "bd3-4": "BD3 b4 ancestral 1024 steps"}


def runs(work: Path) -> dict[str, Path]:
    r = work / "runs"
    return {"ar": r / "ar-base-s0-3000", "mdlm": r / "mdlm-base-s0-3000", "bd3-16": r / "bd3lm-b16-s0-3000",
            "bd3-4": r / "bd3lm-b4-s0-3000", "student": r / "sdtt-from-mdlm-base-s0-3000"}


def train_missing(work: Path, data: Path) -> None:
    """The runs this bench needs that bench/mdm_vs_ar.py does not make: block diffusion, the student."""
    paths = runs(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data_args = [f"--data.train_dir={data / 'train'}", f"--data.val_dir={data / 'val'}"]
    for name in ("ar", "mdlm"):
        if not (paths[name] / "bench-result.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "bench" / "mdm_vs_ar.py"), "--variants", "base", "--seeds", "0",
                            "--objectives", name], check=True)
    for block in (16, 4):
        out = paths[f"bd3-{block}"]
        if (out / "bench-result.json").is_file():
            continue
        args = [a.format(steps=3000) for a in BASE]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "unmask", "train", str(ROOT / "configs" / "tiny.toml"), *args, *data_args,
                        "--train.seed=0", f"--train.run_dir={out}", "--diffusion.objective=bd3lm",
                        f"--diffusion.block_size={block}", "--checkpoint.resume=never"], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        (out / "bench-result.json").write_text(json.dumps(final_validation(out)))
        print(f"  trained block diffusion b{block} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = paths["student"]
    if not (out / "checkpoints" / "latest").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "unmask", "distill", str(ROOT / "configs" / "distill-demo-cpu.toml"),
                        "--teacher", str(paths["mdlm"]), *data_args, f"--train.run_dir={out}",
                        "--distill.start_steps=256", "--distill.final_steps=8", "--distill.steps_per_round=400",
                        "--distill.eval=false", "--checkpoint.interval_steps=2000", "--train.threads=1"],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        print(f"  distilled the student ({time.perf_counter() - t0:.0f} s)", flush=True)


def spread(values: list[float], fmt: str = ".1f") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):{fmt}} +- {sd:{fmt}}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=32, help="sequences per row and seed (one batch)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-mdm-vs-ar")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-only", action="store_true", help="train the missing runs, measure nothing")
    args = p.parse_args()
    from unmask.eval.api import load_reference, samples_at
    from unmask.inference import load

    train_missing(args.work, prepare(args.work))
    if args.train_only:
        return
    torch.set_num_threads(args.threads)
    judge = load_reference("smollm2")
    loaded = {name: load(path, "cpu") for name, path in runs(args.work).items()}
    print(f"BBC News, tiny models, {args.samples} unconditional samples of {LENGTH} positions per row and seed, "
          f"seeds {args.seeds}, {args.threads} thread(s); judge SmolLM2-135M")
    results = {}
    for row in args.rows:
        run, knobs = ROWS[row]
        knobs = dict(knobs)
        steps = knobs.pop("steps")
        samples_at(loaded[run], min(steps, 128), None, num_samples=2, length=LENGTH, **knobs)  # warm-up, untimed
        got = [samples_at(loaded[run], steps, judge, num_samples=args.samples, length=LENGTH, seed=s, **knobs)
               for s in args.seeds]
        results[row] = got
        entropy = spread([g["unigram_entropy"] for g in got], ".2f")
        print(f"  {row}: {spread([g['tokens_per_s'] for g in got])} tok/s, NFE {spread([g['nfe'] for g in got])}, "
              f"gen PPL {spread([g['gen_ppl'] for g in got])}, entropy {entropy}", flush=True)
    table(results)
    print("\ncommand: python bench/generation.py " + " ".join(sys.argv[1:]))


def table(results: dict) -> None:
    ar = results.get("AR, KV cache")
    ar_speed = statistics.mean(g["tokens_per_s"] for g in ar) if ar else None
    print("\n| setting | NFE | tokens/s | vs AR | gen PPL (SmolLM2) | vs own 1024-step | unigram entropy |\n"
          "|---|---|---|---|---|---|---|")
    for row, got in results.items():
        speed = [g["tokens_per_s"] for g in got]
        ppl = [g["gen_ppl"] for g in got]
        own = results.get(OWN_REFERENCE.get(ROWS[row][0], ""))
        ratio = f"{statistics.mean(ppl) / statistics.mean(g['gen_ppl'] for g in own):.2f}" if own else "-"
        vs_ar = f"{statistics.mean(speed) / ar_speed:.2f}x" if ar_speed else "-"
        entropy = spread([g["unigram_entropy"] for g in got], ".2f")
        print(f"| {row} | {spread([g['nfe'] for g in got], '.0f')} | {spread(speed)} | {vs_ar} | {spread(ppl, '.0f')} "
              f"| {ratio} | {entropy} |")


if __name__ == "__main__":
    main()
