"""`unmask plot RUN_DIR` writes PNGs of loss, validation and LR curves from metrics.jsonl."""

import json

from unmask.cli import main
from unmask.eval.curves import plot_run, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir):
    run_dir.mkdir()
    rows = [{"step": s, "loss": 5.0 / s, "lr": 1e-3 * min(s, 3) / 3, "tokens_per_s": 1000.0} for s in range(1, 9)]
    rows += [{"step": 4, "val_nelbo": 2.0, "val_ppl_bound": 7.4}, {"step": 8, "val_nelbo": 1.5, "val_ppl_bound": 4.5}]
    rows += [{"step": 7, "loss": 0.1, "lr": 1e-3}]  # a resumed run re-logs step 7: the last row wins
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 9, "lo'  # killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)


def test_plot_writes_pngs(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    train, val = read_metrics(run)
    assert sorted(train) == list(range(1, 9)) and train[7]["loss"] == 0.1 and sorted(val) == [4, 8]
    paths = plot_run(run)
    assert [p.name for p in paths] == ["loss.png", "val.png", "lr.png"]
    for p in paths:
        assert p.parent == run / "plots" and p.read_bytes()[:8] == PNG


def test_cli(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    assert main(["plot", str(run), "--out", str(tmp_path / "pngs")]) == 0
    assert (tmp_path / "pngs" / "loss.png").read_bytes()[:8] == PNG
    assert main(["plot", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl does not exist" in err[0]


def test_run_without_validation(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "lr": 1e-4}) + "\n")
    assert [p.name for p in plot_run(run)] == ["loss.png", "lr.png"]
