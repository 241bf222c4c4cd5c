"""`unmask eval`: how good and how fast a model is, as JSON (+ a PNG of quality versus sampling steps).

(a) held-out NELBO / perplexity bound with its standard error on shards (NLL / perplexity for AR models);
(b) generative perplexity of unconditional samples under a reference causal LM (an unmask AR checkpoint,
    or any local Hugging Face causal-LM folder), retokenised, at each requested number of steps;
(c) unigram entropy and distinct-n of the samples (mode collapse shows as low entropy);
(d) speed: generated tokens/s and network evaluations (NFE).
The measurements are unmask/eval/api.py; this module only parses the command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints/step-* folder, or `unmask export` folder")
    p.add_argument("--raw-weights", action="store_true",
                   help="a training checkpoint's raw weights, not its EMA of them (kept when train.ema_decay > 0)")
    p.add_argument("--shards", help="split dir for the likelihood (default: the run's data.val_dir)")
    p.add_argument("--batches", type=int, default=16, help="held-out batches of --batch-size sequences")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--time-samples", type=int, default=8, help="NELBO time samples per sequence")
    p.add_argument("--reference", help="generative-perplexity reference: unmask AR checkpoint, HF causal-LM folder, "
                   "a .gguf file in one, or `smollm2` (the eval extra's SmolLM2-135M)")
    p.add_argument("--steps", default="16,64", help="comma-separated sampling steps to evaluate samples at")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--length", type=int, default=128, help="tokens per unconditional sample")
    p.add_argument("--sampler", default="ancestral",
                   help="ancestral (MDLM), remask (LLaDA/MaskGIT) or threshold (Fast-dLLM parallel decoding)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: all)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive blocks of this length")
    p.add_argument("--threshold", type=float, default=0.9, help="threshold sampler: confidence to commit a token at")
    p.add_argument("--noise-removal", default=None, choices=["greedy", "ancestral"],
                   help="uniform-state (duo) runs: the sampler's last step, greedy (Duo's greedy tail, the default) or "
                   "ancestral")
    p.add_argument("--kv-cache", default="none", choices=["none", "prefix", "dual"],
                   help="Fast-dLLM's approximate KV cache (recomputed at each block start)")
    p.add_argument("--cache-refresh", type=int, default=0, help="also recompute the KV cache every N network calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N: the model "
                   "and the reference LM")
    p.add_argument("--out", required=True, help="results JSON; the plot goes next to it (.png)")
    p.add_argument("--track", action="store_true",
                   help="also log the results to mlflow (the run's tracking settings; experiment <name>-eval)")


def run(args: argparse.Namespace) -> int:
    from unmask.eval.api import likelihood, load_reference, samples_at, text_baselines, track
    from unmask.inference import load, pick_device

    device = pick_device(args.device)
    loaded = load(args.checkpoint, device, weights="raw" if args.raw_weights else "auto")
    results: dict = {"checkpoint": str(args.checkpoint), "objective": loaded.objective, "weights": loaded.weights}
    shards = args.shards or (loaded.config.data.val_dir if loaded.config else None)
    if shards:
        results["likelihood"] = likelihood(loaded, shards, batches=args.batches, batch_size=args.batch_size,
                                           time_samples=args.time_samples)
    if loaded.objective != "ar":
        reference = load_reference(args.reference, device) if args.reference else None
        knobs = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                 "block_length": args.block_length, "threshold": args.threshold, "kv_cache": args.kv_cache,
                 "cache_refresh": args.cache_refresh}
        if loaded.process == "uniform" or args.noise_removal:  # a masked run refuses it in samples_at, clearly
            knobs["noise_removal"] = args.noise_removal or "greedy"  # said, since the scores depend on it
        results["sampler"] = {"kind": args.sampler, **knobs}  # scores depend on it: say which
        results["samples"] = [samples_at(loaded, int(s), reference, num_samples=args.num_samples, length=args.length,
                                         sampler=args.sampler, seed=args.seed, **knobs)
                              for s in args.steps.split(",")]
        if reference and shards:
            results["text_baselines"] = text_baselines(loaded, shards, reference, num_samples=args.num_samples,
                                                       length=args.length, seed=args.seed)
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
