"""The GPU check: a preset (default `1b`) trained on one GPU against the planner's figures, and, with >= 2 GPUs, the
TP / ZeRO-3 / PP equivalence checks over NCCL. Prints figures; the equivalence checks pass or fail (exit 1).

1. Equivalence (>= 2 GPUs; first, while this process holds no GPU memory). Synthetic text (a fixed random-word
   corpus, so nothing is downloaded) -> prepare-data -> the tiny model trained 2 steps with `torchrun
   --nproc_per_node=2 -m unmask train` (NCCL, the real CLI) in each layout, and in one GPU process with the same
   global batch. The consolidated weights (what `unmask export` writes) must agree within 5e-5: with lr 1e-5 an
   Adam sign flip moves a weight by 2e-5, a wrongly merged shard by the init's std (0.02).
2. The CLI on the GPUs (>= 1 GPU): the tiny model in the presets' own layout (bf16, ZeRO-3, activation
   checkpointing) through `torchrun -m unmask train` over NCCL: 20 steps with validation and a checkpoint every
   10, a resume to 30, a 2-round distillation from it, `unmask export` loaded by transformers on the GPU (its
   logits against the fp32 CPU load), and `unmask sample`. Every small collective (preemption flags, save
   agreement, validation sums) runs on NCCL here, so a CPU tensor handed to one fails the run.
3. Throughput on GPU 0: the preset's model, seq_len, micro-batch, accumulation, dtype, ZeRO stage and activation
   checkpointing on one GPU (tp = pp = 1, DeepSpeed engine), synthetic token batches, `--steps` timed after
   `--warmup`. Printed beside `unmask plan`'s figures for the same layout: per-rank memory (memory model) and
   tokens/s at its assumed MFU (--mfu, the planner's default 0.4).

    python bench/gpu.py [--config configs/1b.toml ...] [--steps 30] [--warmup 5] [--skip-equivalence] [--skip-cli]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_GPU = "no CUDA device: this benchmark needs a GPU"
LAYOUTS = ["--parallel.tp=2", "--parallel.zero_stage=3", "--parallel.pp=2",
           "--parallel.zero_stage=3 --parallel.activation_checkpointing=true --train.dtype=bf16"]
TINY = ["--train.steps=2", "--train.val_every=0", "--train.log_every=1", "--optim.lr=1e-5", "--data.num_workers=0",
        "--checkpoint.interval_steps=0", "--train.micro_batch_size=4"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", nargs="*", default=[str(REPO / "configs" / "1b.toml")],
                   help="presets to benchmark (none: no throughput run)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, kernels)")
    p.add_argument("--mfu", type=float, default=0.4, help="the planner's assumed MFU to compare with")
    p.add_argument("--skip-equivalence", action="store_true", help="no TP/ZeRO/PP equivalence runs")
    p.add_argument("--skip-cli", action="store_true", help="no train/resume/distill/export/sample CLI run")
    p.add_argument("--work", help="folder for the equivalence runs (default: a temporary one)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ equivalence


def synthetic_shards(out: Path) -> Path:
    """A fixed random-word corpus (~0.5 MB) through prepare-data: vocab 512, seq_len 128, like the tests' shards."""
    from unmask.data.prepare import PrepareOptions, prepare_data

    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for doc in range(40):
        lines = [" ".join(rng.choices(words, k=rng.randint(5, 15))) + "." for _ in range(120)]
        (corpus / f"doc{doc}.txt").write_text("\n".join(lines))
    data = out / "data"
    prepare_data(PrepareOptions(inputs=[str(corpus)], out=data, vocab_size=512, seq_len=128, val_fraction=0.1,
                                workers=2, progress=False))
    return data


def unmask_cli(*args: str, nproc: int = 0) -> str:
    """`python -m unmask ARGS` (under `torchrun --nproc_per_node=nproc` when nproc > 0); its standard output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    cmd = [sys.executable, *launcher, "-m", "unmask", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def train_cli(data: Path, run_dir: Path, nproc: int, *extra: str, command: str = "train") -> str:
    args = [command, str(REPO / "configs" / "tiny.toml"), f"--data.train_dir={data / 'train'}",
            f"--data.val_dir={data / 'val'}", f"--train.run_dir={run_dir}", *TINY, *extra]
    return unmask_cli(*args, nproc=0 if nproc == 1 else nproc)


def equivalence(work: Path) -> bool:
    """Each layout's consolidated weights against one GPU process with the same global batch; True if all pass."""
    from unmask.checkpoint.consolidate import load_checkpoint_weights

    data = synthetic_shards(work)
    ok = True
    for layout in LAYOUTS:
        extra = layout.split()
        dp = 1 if "--parallel.tp=2" in extra or "--parallel.pp=2" in extra else 2  # one process sees dp's batches
        name = layout.replace("--parallel.", "").replace("--train.", "").replace(" ", ",")
        t0 = time.perf_counter()
        train_cli(data, work / name, 2, "--parallel.engine=deepspeed", *extra)
        train_cli(data, work / f"{name}-single", 1, f"--train.micro_batch_size={4 * dp}")
        _, a = load_checkpoint_weights(work / name)
        _, b = load_checkpoint_weights(work / f"{name}-single")
        worst = max((a[k] - b[k]).abs().max().item() for k in a) if a.keys() == b.keys() else float("inf")
        atol = 5e-4 if "bf16" in layout else 5e-5  # bf16: the masters start from the bf16-rounded init
        passed = worst < atol
        ok &= passed
        print(f"equivalence {name:<50} max |w - w_1gpu| = {worst:.2e} (tol {atol:.0e})  "
              f"{'PASS' if passed else 'FAIL'}  {time.perf_counter() - t0:.0f} s", flush=True)
    return ok


# ------------------------------------------------------------------------------------------------ the CLI


PRESET_LAYOUT = ["--parallel.engine=deepspeed", "--parallel.zero_stage=3", "--parallel.activation_checkpointing=true",
                 "--train.dtype=bf16"]


def ours(log: str) -> list[str]:
    """unmask's own lines of a command's output (not the libraries' warnings)."""
    return [line for line in log.splitlines() if line.startswith("unmask")] or ["(no unmask lines)"]


def cli_check(work: Path, nproc: int) -> bool:
    """train (NCCL, the presets' layout) -> resume -> distill -> export -> transformers on GPU -> sample."""
    import torch

    data = synthetic_shards(work)
    run, t0 = work / "cli-run", time.perf_counter()
    common = [*PRESET_LAYOUT, "--train.val_every=10", "--checkpoint.interval_steps=10", "--optim.lr=1e-3"]
    log = train_cli(data, run, nproc, *common, "--train.steps=20")
    print(f"cli train: 20 steps on {nproc} GPU(s) {time.perf_counter() - t0:.0f} s; last lines:", flush=True)
    print("\n".join("  " + line for line in ours(log)[-3:]), flush=True)
    log = train_cli(data, run, nproc, *common, "--train.steps=30")
    resumed = "resumed from" in log
    print(f"cli resume to 30: {'PASS' if resumed else 'FAIL (no resume line)'}; last line: "
          f"{ours(log)[-1]}", flush=True)
    log = train_cli(data, work / "cli-distill", nproc, *common, "--train.steps=20", "--distill.start_steps=32",
                    "--distill.final_steps=8", "--distill.steps_per_round=10", "--distill.eval_samples=4",
                    "--distill.eval_teacher_steps=[32,8]", "--distill.eval_student_steps=[8]",
                    "--distill.teacher_dtype=bf16", "--parallel.zero_stage=2", f"--teacher={run}",
                    command="distill")  # distillation keeps whole weights: ZeRO <= 2
    print("cli distill: 2 rounds; last lines:\n" + "\n".join("  " + x for x in ours(log)[-3:]),
          flush=True)
    unmask_cli("export", "--checkpoint", str(run), "--out", str(work / "hf"))
    from transformers import AutoModelForMaskedLM

    cpu = AutoModelForMaskedLM.from_pretrained(work / "hf", trust_remote_code=True).eval()
    gpu = AutoModelForMaskedLM.from_pretrained(work / "hf", trust_remote_code=True).eval().to("cuda")
    tokens = torch.randint(5, cpu.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cpu(tokens).logits
        fp32 = (gpu(tokens.cuda()).logits.float().cpu() - ref).abs().max().item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = (gpu(tokens.cuda()).logits.float().cpu() - ref).abs().max().item()
    export_ok = fp32 < 1e-3 and bf16 < 0.25 * ref.abs().max().item()
    print(f"cli export -> transformers on cuda: max |logits - cpu fp32| fp32 {fp32:.1e}, bf16 autocast {bf16:.1e} "
          f"(|logits| max {ref.abs().max().item():.1f})  {'PASS' if export_ok else 'FAIL'}", flush=True)
    out = unmask_cli("sample", "--checkpoint", str(run), "--num-samples", "2", "--length", "64", "--steps", "16")
    print(f"cli sample: {next(x for x in out.splitlines() if x.startswith('{'))[:160]}", flush=True)
    print(f"cli check {time.perf_counter() - t0:.0f} s in all", flush=True)
    return resumed and export_ok


# ------------------------------------------------------------------------------------------------ throughput


def throughput(config: str, steps: int, warmup: int, mfu: float) -> None:
    import torch

    from unmask.config import load_config
    from unmask.data.special import SpecialTokens
    from unmask.diffusion.noise import BatchKey
    from unmask.engines import build_components
    from unmask.model.counting import param_count, train_flops_per_token
    from unmask.parallel.dims import setup_parallel
    from unmask.plan.layouts import speed
    from unmask.plan.memory import Layout, estimate
    from unmask.train.metrics import device_peak_flops

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ[key] = value
    cfg = load_config(config, ["--parallel.engine=deepspeed", "--parallel.tp=1", "--parallel.pp=1",
                               f"--train.steps={steps + warmup}", "--optim.warmup_steps=0"])
    t = cfg.train
    dims = setup_parallel(cfg)
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    engine = build_components(cfg, dims, device, SpecialTokens()).engine
    g = torch.Generator().manual_seed(0)
    micro = [torch.randint(5, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len), generator=g)
             for _ in range(t.grad_accum)]
    batch = t.micro_batch_size * t.grad_accum

    def step(i: int) -> None:
        engine.train_step(micro, [BatchKey(i, m, 0, 1, batch) for m in range(t.grad_accum)])

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0

    fpt = train_flops_per_token(cfg.model, t.seq_len)
    peak = device_peak_flops(device, t.dtype)
    tps = steps * batch * t.seq_len / dt
    layout = Layout.from_config(cfg, 1)
    plan = estimate(cfg, layout)
    gib = 2**30
    print(f"{config}: {param_count(cfg.model) / 1e9:.2f}B parameters on {torch.cuda.get_device_name(0)}, {t.dtype}, "
          f"seq_len {t.seq_len}, micro {t.micro_batch_size} x accum {t.grad_accum}, ZeRO {layout.zero}, "
          f"activation checkpointing {'on' if layout.ckpt else 'off'}; {steps} steps timed after {warmup}")
    if peak:
        planned = speed(layout, 1, peak, mfu, fpt)
        print(f"tokens/s {tps:,.0f} (plan at MFU {mfu:.0%}: {planned:,.0f}, ratio {tps / planned:.2f}); "
              f"MFU {tps * fpt / peak:.1%} of {peak / 1e12:.0f} TFLOP/s")
    else:
        print(f"tokens/s {tps:,.0f}; MFU unknown (GPU not in unmask/plan/gpus.py)")
    print(f"peak memory GiB: allocated {torch.cuda.max_memory_allocated() / gib:.1f}, reserved "
          f"{torch.cuda.max_memory_reserved() / gib:.1f}; plan {plan.total / gib:.1f} (states "
          f"{plan.model_states / gib:.1f}, act {plan.activations / gib:.1f}, tmp "
          f"{(plan.logits + plan.buffers + plan.overhead) / gib:.1f} incl. {plan.overhead / gib:.0f} CUDA/NCCL)")
    memory_breakdown(engine, micro[0], BatchKey(steps + warmup, 0, 0, 1, batch), plan)  # after: it resets the peak


def memory_breakdown(engine, x0, key, plan) -> None:
    """One micro-batch's forward and backward outside the timed steps, against the planner's terms: what the
    forward leaves for backward (planned: activations), the loss's own transient on top of the network's output
    (planned: logits), and the backward's peak above the forward's."""
    import torch

    gib = 2**30
    ds = engine.ds
    torch.cuda.synchronize()
    states = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = engine.objective.loss(ds, x0.to(engine.device), key)
    torch.cuda.synchronize()
    kept, fwd_peak = torch.cuda.memory_allocated() - states, torch.cuda.max_memory_allocated() - states
    torch.cuda.reset_peak_memory_stats()
    ds.backward(out.loss)
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated() - states
    print(f"one micro-batch, GiB above the {states / gib:.1f} held before it: kept for backward {kept / gib:.1f} "
          f"(planned activations {plan.activations / gib:.1f}), forward peak {fwd_peak / gib:.1f}, backward peak "
          f"{bwd_peak / gib:.1f} (planned activations + logits {(plan.activations + plan.logits) / gib:.1f})",
          flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    ok = True
    if not args.skip_equivalence:
        if torch.cuda.device_count() >= 2:
            with tempfile.TemporaryDirectory(prefix="unmask-gpu-") as tmp:
                ok = equivalence(Path(args.work) if args.work else Path(tmp))
        else:
            print("one GPU: the TP/ZeRO/PP equivalence checks need 2 and are skipped")
    if not args.skip_cli:
        with tempfile.TemporaryDirectory(prefix="unmask-cli-") as tmp:
            ok &= cli_check(Path(args.work or tmp) / "cli", min(2, torch.cuda.device_count()))
    if len(args.config) == 1:
        throughput(args.config[0], args.steps, args.warmup, args.mfu)
    for config in args.config if len(args.config) > 1 else []:  # one process each: a preset's memory stays held
        cmd = [sys.executable, __file__, "--skip-equivalence", "--skip-cli", f"--steps={args.steps}",
               f"--warmup={args.warmup}", f"--mfu={args.mfu}", "--config", config]
        ok &= subprocess.run(cmd).returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
