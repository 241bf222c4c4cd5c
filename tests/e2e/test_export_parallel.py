"""Every layout the shipped presets train with exports the weights of the equivalent one-process run, and the export
gives the logits of those weights.

Layouts: each shipped config with a `[parallel]` section, on the tiny shape (its dtype, ZeRO stage, activation
checkpointing and offload kept; tp/pp cut to what 2 CPU ranks hold), so a preset change is covered
without editing this file; plus fp32 TP, ZeRO-3 and PP, bf16 ZeRO-3 and PP with activation checkpointing, and TP x PP
on 4 ranks. In bf16 runs the export must come from DeepSpeed's fp32 masters: they round to the saved bf16 module
weights exactly (where DeepSpeed keeps those; ZeRO-3 does not) and are not themselves bf16 values.

Adam's first steps move every weight by about +-lr whatever the gradient's size, so float-level differences
between layouts can flip a near-zero gradient's sign and move that weight by 2 lr. A small lr keeps that far
below the error a wrongly merged shard makes (the init's std, 0.02), so the comparison tests consolidation.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from safetensors.torch import load_file

from tests.support.fresh_hf import run_fresh
from tests.support.runs import HANG_GUARD_S, REPO, tiny_cli_args
from unmask.checkpoint.consolidate import load_checkpoint_weights, load_model
from unmask.export.hf import export
from unmask.model.hf.adapter import to_hf

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
COMMON = ("--train.steps=2", "--train.val_every=0", "--train.log_every=1", "--optim.lr=1e-4", "--train.threads=1",
          "--data.num_workers=0", "--checkpoint.interval_steps=0")
MICRO = 4
# What the presets keep on the tiny shape; everything else ([model], seq_len, micro-batch, data) is the tiny run's.
KEPT = {"parallel": ("engine", "zero_stage", "activation_checkpointing", "cpu_offload"),
        "train": ("dtype",)}


def preset_layouts(ranks: int = 2) -> list:
    """(overrides, processes) for each shipped config that sets a parallel layout; presets that come to the same
    tiny layout share one run (its id names them all)."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "configs").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        if "parallel" not in data:
            continue
        args = [f"--{sec}.{key}={str(data[sec][key]).lower() if isinstance(data[sec][key], bool) else data[sec][key]}"
                for sec, keys in KEPT.items() for key in keys if key in data.get(sec, {})]
        tp = min(data["parallel"].get("tp", 1), ranks)
        pp = min(data["parallel"].get("pp", 1), ranks // tp)
        found.setdefault(" ".join([*args, f"--parallel.tp={tp}", f"--parallel.pp={pp}"]), []).append(path.stem)
    return [pytest.param(layout, ranks, id="preset-" + "+".join(names)) for layout, names in found.items()]


DS = "--parallel.engine=deepspeed"
BF16_AC = "--train.dtype=bf16 --parallel.activation_checkpointing=true"
LAYOUTS = [
    *preset_layouts(),
    pytest.param(f"{DS} --parallel.tp=2", 2, id="tp2-fp32"),
    pytest.param(f"{DS} --parallel.zero_stage=3", 2, id="zero3-fp32"),
    pytest.param(f"{DS} --parallel.pp=2", 2, id="pp2-fp32"),
    pytest.param(f"{DS} --parallel.zero_stage=3 {BF16_AC}", 2, id="zero3-bf16-ac"),
    pytest.param(f"{DS} --parallel.pp=2 --parallel.zero_stage=1 {BF16_AC}", 2, id="pp2-bf16-ac"),
    pytest.param(f"{DS} --parallel.tp=2 --parallel.pp=2 --parallel.zero_stage=1 {BF16_AC}", 4, id="tp2xpp2-bf16-ac"),
]


def torchrun(shards, run_dir, nproc, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "unmask", "train", *tiny_cli_args(shards, run_dir, *COMMON, *extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


def local(shards, run_dir, *extra):
    from unmask.cli import main

    assert main(["train", *tiny_cli_args(shards, run_dir, *COMMON, *extra)]) == 0


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def arg(layout: str, key: str, default: str) -> str:
    found = [a.split("=", 1)[1] for a in layout.split() if a.startswith(f"--{key}=")]
    return found[-1] if found else default


@pytest.mark.parametrize("layout, nproc", LAYOUTS)
def test_parallel_checkpoint_exports_the_single_process_model(tiny_shards, tmp_path, layout, nproc):
    tp, pp = int(arg(layout, "parallel.tp", "1")), int(arg(layout, "parallel.pp", "1"))
    dp = nproc // (tp * pp)
    bf16 = arg(layout, "train.dtype", "fp32") == "bf16"
    torchrun(tiny_shards, tmp_path / "parallel", nproc, *layout.split(), f"--train.micro_batch_size={MICRO}")
    # One fp32 process sees the global batch of the dp replicas. bf16: DeepSpeed's fp32 masters start from the
    # bf16-rounded init (relative error 2^-9 of weights up to ~0.08), so they match the fp32 run to that only.
    local(tiny_shards, tmp_path / "single", f"--train.micro_batch_size={MICRO * dp}")
    atol = 5e-4 if bf16 else 5e-5
    cfg, parallel = load_checkpoint_weights(tmp_path / "parallel")
    _, single = load_checkpoint_weights(tmp_path / "single")
    assert all(v.dtype == torch.float32 for v in parallel.values())
    assert worst(parallel, single) < atol
    if bf16:  # the fp32 masters came back, not the bf16 module copies
        assert any((v != v.bfloat16().float()).any() for v in parallel.values())
        if cfg.parallel.zero_stage < 3:
            _, module = load_checkpoint_weights(tmp_path / "parallel", masters=False)
            assert all(torch.equal(parallel[k].bfloat16().float(), module[k]) for k in parallel)

    export(tmp_path / "parallel", tmp_path / "hf")
    assert worst(load_file(tmp_path / "hf" / "model.safetensors"), to_hf(parallel, cfg.model.tie_embeddings)) == 0
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    got = run_fresh([{"folder": str(tmp_path / "hf"), "tokens": tokens, "t": None, "templates": [],
                      "options": []}], tmp_path)[0]["logits"]
    _, trained, _, _ = load_model(tmp_path / "parallel")
    _, reference, _, _ = load_model(tmp_path / "single")
    with torch.no_grad():
        torch.testing.assert_close(got, trained(tokens), atol=1e-5, rtol=0)  # the export is the checkpoint
        # ... and the checkpoint is the one-process model, to the weight tolerance above carried to logits.
        assert (got - reference(tokens)).abs().max().item() < 200 * atol


def test_every_preset_layout_is_covered():
    names = {n for p in preset_layouts() for n in p.id.removeprefix("preset-").split("+")}
    assert {"125m", "1b", "8b"} <= names, names
    assert Path(REPO / "configs" / "tiny.toml").is_file()
