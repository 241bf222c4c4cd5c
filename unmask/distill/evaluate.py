"""Quality versus sampling steps, teacher against student: generative perplexity (when a reference AR judge is
configured), unigram entropy and wall time of unconditional samples, as distill_eval.json and distill_eval.png in
the run directory. Rows are made by the same code as `unmask eval` (unmask.eval.api.samples_at).

Every row is measured on `distill.eval_seeds` sample sets (one seed each) and reported as mean +- sd over them, with
each set's value kept: a comparison between rows is only worth stating when every set agrees on it (`verdicts`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from pathlib import Path

from torch import nn

from unmask.config import Config
from unmask.eval.plot import plot_quality_vs_steps


def evaluate_run(cfg: Config, student: nn.Module, run_dir: Path, say=print) -> dict:
    """Sample the teacher (cfg.distill.teacher) at eval_teacher_steps and `student` at eval_student_steps, with
    the sampler of the teacher's process (`Loaded.process`: masked, or uniform-state for a duo teacher), which the
    student shares."""
    from unmask.eval.api import load_reference, samples_at
    from unmask.inference import load

    d = cfg.distill
    teacher = load(d.teacher, weights=d.teacher_weights)
    student_loaded = dataclasses.replace(teacher, model=copy.deepcopy(student).float().cpu().eval())
    reference = load_reference(d.reference) if d.reference else None
    length = d.eval_length or cfg.train.seq_len
    rows = []
    for name, loaded, steps_list in (("teacher", teacher, d.eval_teacher_steps),
                                     ("student", student_loaded, d.eval_student_steps)):
        for steps in steps_list:
            sets = [samples_at(loaded, steps, reference, num_samples=d.eval_samples, length=length, seed=seed,
                               block_length=d.eval_block_length) for seed in d.eval_seeds]
            rows.append(summarise(name, steps, sets))
            say(f"{name} at {steps} steps: {format_row(rows[-1])}")
    table = write_table({"teacher": d.teacher, "reference": d.reference, "objective": d.objective,
                         "seeds": list(d.eval_seeds), "rows": rows}, run_dir)
    say(f"teacher against student ({d.eval_samples} samples per row and set, {len(d.eval_seeds)} sets, judge "
        f"{d.reference or 'none'}; {Path(run_dir) / 'distill_eval.json'}):\n{format_table(table)}")
    return table


def summarise(model: str, steps: int, sets: list[dict]) -> dict:
    """One table row from the rows of its sample sets: each metric's mean, its sd over sets (`*_sd`, nan for one
    set) and every set's value (`*_sets`)."""
    row = {"model": model, "steps": steps, "nfe": sets[0]["nfe"], "example": sets[0]["example"]}
    for metric in ("gen_ppl", "gen_bits_per_byte", "unigram_entropy", "seconds"):
        if metric not in sets[0]:
            continue
        values = [s[metric] for s in sets]
        name = "wall_s" if metric == "seconds" else metric
        row[name] = statistics.mean(values)
        row[f"{name}_sd"] = statistics.stdev(values) if len(values) > 1 else float("nan")
        row[f"{name}_sets"] = values
    return row


def format_row(row: dict) -> str:
    ppl = f"gen ppl {row['gen_ppl']:.1f} +- {row['gen_ppl_sd']:.1f}, " if "gen_ppl" in row else ""
    return f"{ppl}entropy {row['unigram_entropy']:.3f}, {row['wall_s']:.2f}s"


def format_table(table: dict) -> str:
    """The rows of a distill_eval.json table as aligned text."""
    lines = [f"{'model':8} {'steps':>5} {'gen ppl (mean +- sd)':>21} {'entropy':>7} {'wall s':>7}"]
    for r in table["rows"]:
        ppl = f"{r['gen_ppl']:.1f} +- {r['gen_ppl_sd']:.1f}" if "gen_ppl" in r else "-"
        lines.append(f"{r['model']:8} {r['steps']:5d} {ppl:>21} {r['unigram_entropy']:7.3f} {r['wall_s']:7.2f}")
    lines += verdicts(table)
    return "\n".join(lines)


def verdicts(table: dict) -> list[str]:
    """The issue's two comparisons, where the table has their rows and a judge: the student at 16 steps against the
    teacher at 16 (lower in how many sets, and by more than the larger spread?), and the student at 8 against the
    teacher at 1024 (within 25% in every set?)."""
    rows = {(r["model"], r["steps"]): r for r in table["rows"] if "gen_ppl" in r}
    out = []
    student, teacher = rows.get(("student", 16)), rows.get(("teacher", 16))
    if student and teacher:
        lower = sum(s < t for s, t in zip(student["gen_ppl_sets"], teacher["gen_ppl_sets"], strict=True))
        margin, spread = teacher["gen_ppl"] - student["gen_ppl"], max(student["gen_ppl_sd"], teacher["gen_ppl_sd"])
        out.append(f"student@16 below teacher@16 in {lower}/{len(student['gen_ppl_sets'])} sets; margin "
                   f"{margin:.1f} against spread {spread:.1f}: " + ("holds" if margin > spread else "does not hold"))
    student, teacher = rows.get(("student", 8)), rows.get(("teacher", 1024))
    if student and teacher:
        ratios = [s / t for s, t in zip(student["gen_ppl_sets"], teacher["gen_ppl_sets"], strict=True)]
        out.append(f"student@8 / teacher@1024 per set: {', '.join(f'{r:.2f}' for r in ratios)}: "
                   + ("within 25% in every set" if max(ratios) <= 1.25 else "not within 25% in every set"))
    return out


def write_table(table: dict, run_dir: Path) -> dict:
    """distill_eval.json and distill_eval.png (gen. perplexity vs steps, or entropy without a reference)."""
    run_dir = Path(run_dir)
    (run_dir / "distill_eval.json").write_text(json.dumps(table, indent=1))
    metric = "gen_ppl" if table["reference"] else "unigram_entropy"
    series: dict[str, list[tuple[int, float]]] = {}
    for row in table["rows"]:
        series.setdefault(row["model"], []).append((row["steps"], row[metric]))
    plot_quality_vs_steps(series, run_dir / "distill_eval.png",
                          ylabel="generative perplexity" if metric == "gen_ppl" else "unigram entropy (nats)",
                          title=f"{table['objective']} distillation", log_y=metric == "gen_ppl")
    return table
