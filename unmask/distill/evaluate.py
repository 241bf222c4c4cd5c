"""Quality versus sampling steps, teacher against student: generative perplexity (when a reference AR judge is
configured), unigram entropy and wall time of unconditional samples, as distill_eval.json and distill_eval.png in
the run directory. Rows are made by the same code as `unmask eval` (unmask.eval.api.samples_at)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from pathlib import Path

from torch import nn

from unmask.config import Config
from unmask.eval.plot import plot_quality_vs_steps


def evaluate_run(cfg: Config, student: nn.Module, run_dir: Path, say=print) -> dict:
    """Sample the teacher (cfg.distill.teacher) at eval_teacher_steps and `student` at eval_student_steps, with
    the sampler of the teacher's process (masked, or uniform-state for a duo teacher: skipped, returning {}, while
    unmask.eval.api.samples_at takes no `process`)."""
    from unmask.eval.api import load_reference, samples_at
    from unmask.inference import load

    d = cfg.distill
    sampling = {}
    if cfg.diffusion.objective == "duo":  # a uniform-state teacher needs the uniform-state sampler
        if "process" not in inspect.signature(samples_at).parameters:
            say("no distillation table: sampling a uniform-state (duo) model needs samples_at(..., process="
                "\"uniform\"), which this build lacks")
            return {}
        sampling["process"] = "uniform"
    teacher = load(d.teacher, weights=d.teacher_weights)
    student_loaded = dataclasses.replace(teacher, model=copy.deepcopy(student).float().cpu().eval())
    reference = load_reference(d.reference) if d.reference else None
    length = d.eval_length or cfg.train.seq_len
    rows = []
    for name, loaded, steps_list in (("teacher", teacher, d.eval_teacher_steps),
                                     ("student", student_loaded, d.eval_student_steps)):
        for steps in steps_list:
            row = {"model": name, **samples_at(loaded, steps, reference, num_samples=d.eval_samples, length=length,
                                              seed=cfg.train.seed, block_length=d.eval_block_length, **sampling)}
            row["wall_s"] = row.pop("seconds")
            rows.append(row)
            say(f"{name} at {steps} steps: entropy {row['unigram_entropy']:.3f}"
                + (f", gen ppl {row['gen_ppl']:.2f}" if "gen_ppl" in row else "") + f", {row['wall_s']:.2f}s")
    table = write_table({"teacher": d.teacher, "reference": d.reference, "objective": d.objective, "rows": rows},
                        run_dir)
    say(f"teacher against student ({d.eval_samples} samples per row, judge {d.reference or 'none'}; "
        f"{Path(run_dir) / 'distill_eval.json'}):\n{format_table(table)}")
    return table


def format_table(table: dict) -> str:
    """The rows of a distill_eval.json table as aligned text."""
    lines = [f"{'model':8} {'steps':>5} {'gen ppl':>8} {'entropy':>7} {'wall s':>7}"]
    for r in table["rows"]:
        lines.append(f"{r['model']:8} {r['steps']:5d} {r.get('gen_ppl', float('nan')):8.1f} "
                     f"{r['unigram_entropy']:7.3f} {r['wall_s']:7.2f}")
    return "\n".join(lines)


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
