"""MDLM+SDTT against Duo+DCD, side by side, at the same budget: each teacher is the tiny model trained from
scratch on the Shakespeare shards for the same steps x 16 x 128 tokens (configs/demo-cpu.toml: MDLM as published,
no time conditioning; configs/duo-demo-cpu.toml: Duo as published, time conditioning and its Gaussian curriculum),
each is distilled with the same rounds (SDTT: distill-demo-cpu.toml, DCD: distill-dcd-demo-cpu.toml, 256 -> 16
steps, 400 optimizer steps a round), then teacher and student of both are sampled at every --steps value with every
seed, judged by the same reference with the same sample count and length. Rows are made by `unmask eval`'s code
(unmask.eval.api.samples_at) and summarised, with the issue's two verdicts, by unmask.distill.evaluate.

    python bench/distill_compare.py                     # the full comparison (hours on 2 CPU cores)
    python bench/distill_compare.py --teacher-steps 30 --rounds 2 --steps-per-round 4 --samples 2 \\
        --steps 8 16 --seeds 0 1 --length 32 --out-dir runs/distill-compare-smoke   # the smoke test
    python bench/distill_compare.py --adapted --device cuda    # step-limited teachers: SmolLM2-135M adapted

--adapted swaps the from-scratch teachers for SmolLM2-135M adapted on the demo's BBC News shards (scripts/demo.sh
makes data/bbc-smollm2) into each kind of diffusion LM (adapt-smollm2-cpu.toml, mdlm, and its duo twin
adapt-duo-smollm2-cpu.toml), distilled with distill-adapt-cpu.toml (SDTT) and distill-dcd-adapt-cpu.toml (DCD),
64 -> 16 steps in 2 rounds. The configs' 70 adaptation steps do not make a step-limited teacher (in random order
the adapted mdlm model scores the same at 16, 64 and 1024 steps: bench/results/adapted-teacher-steps-2026-12-01.md);
give a GPU run a longer adaptation with --teacher-steps. On 2 CPU cores a duo row at 1024 steps alone costs 1025
forwards of the 135M model, about 24 minutes per set of 4 x 64 tokens.

Everything finished is read back, not redone: trained runs (train and distill resume a killed run from its last
checkpoint) and every (method, model, steps, seed) sample set (rows/*.json). The table, the verdicts, each
teacher's held-out NELBO and the command go to OUT_DIR/distill-compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from unmask.distill.evaluate import summarise, verdicts  # noqa: E402

# method -> (teacher config, distill config); the teacher of each is the method's own pretraining objective
METHODS = {"mdlm+sdtt": ("demo-cpu.toml", "distill-demo-cpu.toml"),
           "duo+dcd": ("duo-demo-cpu.toml", "distill-dcd-demo-cpu.toml")}
ADAPTED = {"mdlm+sdtt": ("adapt-smollm2-cpu.toml", "distill-adapt-cpu.toml"),  # --adapted: SmolLM2 is the source
           "duo+dcd": ("adapt-duo-smollm2-cpu.toml", "distill-dcd-adapt-cpu.toml")}


def last_step(run_dir: Path) -> int:
    """The step of the run's latest checkpoint (0: none)."""
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().removeprefix("step-")) if latest.is_file() else 0


def train_or_reuse(cmd: list[str], run_dir: Path, steps: int, log: Path) -> float:
    """Run `cmd` unless run_dir already holds its final checkpoint (a killed run resumes: checkpoint.resume=auto).
    Returns the seconds it took (0 when reused)."""
    if last_step(run_dir) >= steps:
        return 0.0
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if last_step(run_dir) < steps:
        raise SystemExit(f"{run_dir}: finished without a step-{steps} checkpoint; see {log}")
    return time.perf_counter() - t0


def teacher_steps_of(config: str) -> int:
    from unmask.config import load_config

    return load_config(ROOT / "configs" / config).train.steps


def train_models(args, method: str) -> tuple[Path, Path, dict]:
    """The method's teacher and student run dirs, trained now unless finished before, and their wall seconds."""
    teacher_cfg, distill_cfg = (ADAPTED if args.adapted else METHODS)[method]
    data = [f"--data.train_dir={args.shards / 'train'}", f"--data.val_dir={args.shards / 'val'}"]
    steps = args.teacher_steps or teacher_steps_of(teacher_cfg)
    teacher = args.out_dir / f"{method.split('+')[0]}-teacher"
    cmd = [sys.executable, "-m", "unmask", "train", str(ROOT / "configs" / teacher_cfg), *data,
           f"--train.steps={steps}", f"--train.run_dir={teacher}"]
    if args.adapted:
        from unmask.eval.genppl import smollm2_path

        cmd += ["--init-from", str(smollm2_path())]
    elif method.startswith("duo"):  # Duo's curriculum over the same fraction of training whatever the budget
        cmd += [f"--diffusion.curriculum_start={steps // 10}", f"--diffusion.curriculum_end={steps // 5}"]
    seconds = {"teacher_train_s": train_or_reuse(cmd, teacher, steps, args.out_dir / "logs" / f"{teacher.name}.log")}
    student = args.out_dir / f"{method.split('+')[1]}-student"
    rounds = [f"--distill.steps_per_round={args.steps_per_round}"] if args.steps_per_round else []
    if args.rounds:  # final_steps 16 as published; start_steps = 16 x 2^rounds
        rounds += [f"--distill.start_steps={16 << args.rounds}", "--distill.final_steps=16"]
    cmd = [sys.executable, "-m", "unmask", "distill", str(ROOT / "configs" / distill_cfg), "--teacher", str(teacher),
           *data, *rounds, f"--train.run_dir={student}", "--distill.eval=false"]
    from unmask.config import load_config

    d = load_config(ROOT / "configs" / distill_cfg, rounds).distill
    seconds["distill_train_s"] = train_or_reuse(cmd, student, d.rounds * d.steps_per_round,
                                                args.out_dir / "logs" / f"{student.name}.log")
    return teacher, student, seconds


def sample_set(args, loaded, reference, path: Path, steps: int, seed: int) -> dict:
    """One sample set (`samples_at` row), read back when a previous invocation measured it."""
    if path.is_file():
        return json.loads(path.read_text())
    from unmask.eval.api import samples_at

    row = samples_at(loaded, steps, reference, num_samples=args.samples, length=args.length, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))
    return row


def measure(args, method: str, teacher: Path, student: Path, reference) -> tuple[list[dict], dict]:
    """The method's table rows (teacher and student at every steps value, over every seed) and the teacher's
    held-out NELBO."""
    import torch

    from unmask.eval.api import likelihood
    from unmask.inference import load

    torch.set_num_threads(args.threads)
    rows = []
    for model, run_dir, steps_list in (("teacher", teacher, args.steps), ("student", student, args.student_steps)):
        loaded = load(run_dir, args.device)
        for steps in steps_list:
            sets = [sample_set(args, loaded, reference, args.out_dir / "rows" /
                               f"{method}-{model}-{steps}-L{args.length}-n{args.samples}-s{seed}.json", steps, seed)
                    for seed in args.seeds]
            rows.append({"method": method, **summarise(model, steps, sets)})
            print(f"  {format_row(rows[-1])}", flush=True)
    nelbo = likelihood(load(teacher, args.device), str(args.shards / "val"), batches=args.nelbo_batches, batch_size=8)
    return rows, nelbo


def pm(row: dict, metric: str, digits: int) -> str:
    return f"{row[metric]:.{digits}f} +- {row[metric + '_sd']:.{digits}f}" if metric in row else "-"


def format_row(r: dict) -> str:
    return (f"| {r['method']} | {r['model']} | {r['steps']} | {pm(r, 'gen_ppl', 1)} | "
            f"{pm(r, 'gen_bits_per_byte', 3)} | {r['unigram_entropy']:.3f} | {r['wall_s']:.2f} | {r['nfe']} |")


def format_table(rows: list[dict]) -> str:
    head = ("| method | model | steps | gen ppl (mean +- sd) | bits/byte (mean +- sd) | unigram entropy | wall s | "
            "NFE |\n|---|---|---|---|---|---|---|---|")
    order = sorted(rows, key=lambda r: (r["method"], r["model"] != "teacher", r["steps"]))
    return "\n".join([head, *map(format_row, order)])


def method_verdicts(rows: list[dict]) -> dict[str, list[str]]:
    """unmask.distill.evaluate.verdicts on each method's rows."""
    return {m: verdicts({"rows": [r for r in rows if r["method"] == m]}) for m in dict.fromkeys(r["method"]
                                                                                             for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, default=None,
                   help="prepare-data output with train/ and val/ (default data/shakespeare-512 from "
                   "scripts/demo-scratch.sh; --adapted: data/bbc-smollm2 from scripts/demo.sh)")
    p.add_argument("--adapted", action="store_true", help="teachers adapted from SmolLM2-135M (see the docstring)")
    p.add_argument("--device", default="cpu", help="where sampling, judging and the NELBO run (cpu, cuda)")
    p.add_argument("--teacher-steps", type=int, default=None, help="each teacher's steps (default the configs')")
    p.add_argument("--rounds", type=int, default=None, help="distillation rounds (default the configs': 4)")
    p.add_argument("--steps-per-round", type=int, default=None, help="optimizer steps a round (default 400)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=32, help="samples per row and seed")
    p.add_argument("--length", type=int, default=128, help="tokens per sample")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 16, 64, 1024])
    p.add_argument("--student-steps", type=int, nargs="+", default=[8, 16, 64],
                   help="the students' rows (the goal compares student@8 with teacher@1024)")
    p.add_argument("--reference", default="smollm2", help="the judge (unmask.eval.api.load_reference)")
    p.add_argument("--nelbo-batches", type=int, default=16, help="held-out batches of 8 for each teacher's NELBO")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=2, help="torch threads while sampling and judging")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="default runs/distill-compare (--adapted: runs/distill-compare-adapted)")
    args = p.parse_args()
    suffix = "-adapted" if args.adapted else ""
    args.shards = args.shards or ROOT / "data" / ("bbc-smollm2" if args.adapted else "shakespeare-512")
    args.out_dir = args.out_dir or ROOT / "runs" / f"distill-compare{suffix}"
    if not (args.shards / "train" / "manifest.json").is_file():
        script = "scripts/demo.sh" if args.adapted else "scripts/demo-scratch.sh"
        raise SystemExit(f"{args.shards}: no train/manifest.json; make the shards with {script} (steps 1-2) or pass "
                         "--shards")
    command = "python bench/distill_compare.py " + " ".join(sys.argv[1:])
    from unmask.eval.api import load_reference

    reference = load_reference(args.reference, args.device)
    rows, teachers = [], {}
    for method in args.methods:
        print(f"== {method}: train (or reuse) the teacher, distil it", flush=True)
        teacher, student, seconds = train_models(args, method)
        print(f"== {method}: sample at {args.steps} steps, seeds {args.seeds}, {args.samples} x {args.length} "
              f"tokens, judge {args.reference}", flush=True)
        method_rows, nelbo = measure(args, method, teacher, student, reference)
        rows += method_rows
        teachers[method] = {"run_dir": str(teacher), "student_dir": str(student), "nelbo": nelbo, **seconds}
    print("\n" + format_table(rows))
    found = method_verdicts(rows)
    for method, lines in found.items():
        for line in lines:
            print(f"{method}: {line}")
    for method, t in teachers.items():
        n = t["nelbo"]
        print(f"{method} teacher held-out NELBO: {n['nats_per_token']:.3f} +- {n['stderr']:.3f} nats/token "
              f"({n['tokens']} tokens)")
    print("(two different bounds on the same held-out tokens: MDLM's masked-diffusion ELBO and Duo's uniform-state "
          f"ELBO)\nmean +- sd over {len(args.seeds)} sample sets (seeds {args.seeds}) of {args.samples} samples x "
          f"{args.length} tokens, judge {args.reference}; command: {command}")
    out = args.out_dir / "distill-compare.json"
    out.write_text(json.dumps({"command": command, "reference": args.reference, "seeds": args.seeds,
                               "samples": args.samples, "length": args.length, "steps": args.steps,
                               "teachers": teachers, "rows": rows, "verdicts": found}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
