"""`unmask sample`: generate from a checkpoint or an exported folder; JSON Lines out, one row per sample.

Prompts come from --prompt (repeatable) or --prompts-file (one per line). A prompt with `<mask>` or
`<mask:N>` spans is an infilling template (each span becomes --span masks, or N); any other prompt is
continued with masks up to --length. No prompt: --num-samples unconditional samples. --chat / --chat-file ask an
instruction-tuned model: the run's chat template around the question, the answer cut at its first <eos>
(unmask.diffusion.chat).

An autoregressive run (diffusion.objective = "ar") is decoded left to right (sampler `ar`, with its exact KV cache
unless --kv-cache none), so diffusion and AR generation speed are read off the same rows (nfe, tokens_per_second).
A uniform-state run (diffusion.objective = "duo", or an export whose config.json says diffusion_process "uniform") is
sampled by its ancestral posterior sampler, ending in Duo's greedy tail unless --noise-removal ancestral.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints/step-* folder, or `unmask export` folder")
    p.add_argument("--raw-weights", action="store_true",
                   help="a training checkpoint's raw weights, not its EMA of them (kept when train.ema_decay > 0)")
    p.add_argument("--prompt", action="append", default=[], help="prompt or infilling template (repeatable)")
    p.add_argument("--prompts-file", help="one prompt or template per line")
    p.add_argument("--chat", action="append", default=[],
                   help="a question for an SFT model, rendered with the run's chat template; prints the answer, cut "
                   "at its first <eos> (repeatable)")
    p.add_argument("--chat-file", help="JSON Lines of conversations to answer, in prepare-data --format chat's "
                   'formats: {"prompt"} or "messages" ending with the user\'s turn (a given answer is kept as '
                   '"reference")')
    p.add_argument("--num-samples", type=int, default=4, help="unconditional samples when no prompt is given")
    p.add_argument("--length", type=int, default=None, help="sequence length (default: the model's max_seq_len)")
    p.add_argument("--span", type=int, default=8, help="masks per bare <mask> span in a template")
    p.add_argument("--sampler", default=None, help="ancestral (MDLM), remask (LLaDA/MaskGIT), threshold "
                   "(Fast-dLLM parallel decoding) or ar; default: ar for an autoregressive run, else ancestral")
    p.add_argument("--steps", type=int, default=64, help="sampling steps (ancestral, remask)")
    p.add_argument("--noise-removal", default=None, choices=["greedy", "ancestral"],
                   help="uniform-state (duo) runs: the last step, argmax of the model's prediction (greedy: Duo's "
                   "greedy tail, the default) or a last posterior draw (ancestral)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive blocks of this length")
    p.add_argument("--remasking", default="low_confidence", help="low_confidence or random (remask sampler)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight (prompts only)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="threshold sampler: commit every mask whose confidence reaches it (at least one a step)")
    p.add_argument("--kv-cache", default=None, choices=["none", "prefix", "dual"],
                   help="diffusion: Fast-dLLM's approximate KV cache (prefix: the positions before the block; dual: "
                   "before and after); ar and block diffusion (bd3lm): prefix is exact. Default: prefix for an AR "
                   "run, else none")
    p.add_argument("--cache-refresh", type=int, default=0,
                   help="diffusion KV cache: recompute it every N network calls too (0: only at block starts)")
    p.add_argument("--no-cache", action="store_true", help="call the network even when no token changed")
    p.add_argument("--stop-at-eos", action="store_true", help="cut each sample at its first generated <eos>")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N; a seed "
                   "gives the same samples on one device type, not across CPU and GPU (their generators differ)")
    p.add_argument("--out", help="JSON Lines file (default: standard output)")


def run(args: argparse.Namespace) -> int:
    from unmask.diffusion.sampler import SamplerConfig, SamplingError, sample
    from unmask.diffusion.sampler_template import infill_template, prompt_template, split_mask_spans
    from unmask.inference import load, pick_device

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    device = pick_device(args.device)
    loaded = load(args.checkpoint, device, weights="raw" if args.raw_weights else "auto")
    ar = loaded.objective == "ar"
    kind = args.sampler or ("ar" if ar else "ancestral")
    if ar and kind != "ar":
        raise SamplingError(f"{args.checkpoint} is an autoregressive baseline: --sampler {kind} needs a "
                            "masked-diffusion model; use --sampler ar (or leave it out)")
    cfg = SamplerConfig(kind=kind, steps=args.steps, block_length=args.block_length, remasking=args.remasking,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, guidance=args.guidance,
                        cache=not args.no_cache, stop_at_eos=args.stop_at_eos, seed=args.seed,
                        threshold=args.threshold, kv_cache=args.kv_cache or ("prefix" if ar else "none"),
                        cache_refresh=args.cache_refresh,
                        noise_removal=args.noise_removal or ("greedy" if loaded.process == "uniform" else None))
    length = args.length or loaded.model_cfg.max_seq_len
    special, codec = loaded.special, loaded.codec
    chats = None
    if args.chat or args.chat_file:
        from unmask.diffusion import chat

        if prompts:
            raise SamplingError("--chat/--chat-file and --prompt/--prompts-file are two kinds of rows: give one")
        chat_template, source = chat.run_template(loaded)
        chat.note(f"chat prompts rendered with {source}")
        chats = chat.read_chats(args.chat, args.chat_file, chat_template)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 - closed below when a file
    try:
        for start in range(0, len(chats or []), args.batch_size):
            batch = chats[start:start + args.batch_size]
            with torch.no_grad():  # a distinct seed per batch, as below
                rows = chat.answer(loaded.model, batch, replace(cfg, seed=cfg.seed + start), special, codec, length,
                                   loaded.schedule, device, process=loaded.process)
            out.writelines(json.dumps(row) + "\n" for row in rows)
            out.flush()
        rows = [] if chats else prompts or [None] * args.num_samples
        for start, chunk in batches(rows, args.batch_size):
            kind = row_kind(chunk[0])
            if kind == "unconditional":  # all masks after <bos>
                template, prompt_mask = prompt_template([[]] * len(chunk), length, special)
            elif kind == "infill":
                segments = [[s if isinstance(s, int) else codec.encode(s) for s in split_mask_spans(p, args.span)]
                            for p in chunk]
                template, prompt_mask = infill_template(segments, special, length=None)
            else:
                template, prompt_mask = prompt_template([codec.encode(p) for p in chunk], length, special)
            with torch.no_grad():  # a distinct seed per batch, so batches are not copies of each other
                result = sample(loaded.model, template.to(device), replace(cfg, seed=cfg.seed + start), special,
                                loaded.schedule, prompt_mask=prompt_mask.to(device), process=loaded.process)
            for i, ids in enumerate(result.token_lists(special, generated_only=kind == "continue")):
                row = {"prompt": chunk[i], "text": codec.decode(ids), "tokens": ids, **result.stats(),
                       "sampler": cfg.to_dict()}
                out.write(json.dumps(row) + "\n")
            out.flush()
    finally:
        if args.out:
            out.close()
    return 0


def row_kind(prompt: str | None) -> str:
    return "unconditional" if prompt is None else "infill" if "<mask" in prompt else "continue"


def batches(rows: list, size: int):
    """(first index, rows) runs of at most `size` consecutive rows of the same kind (one template shape each)."""
    start = 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and end - start < size and row_kind(rows[end]) == row_kind(rows[start]):
            end += 1
        yield start, rows[start:end]
        start = end
