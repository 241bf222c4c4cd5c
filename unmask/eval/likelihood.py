"""Held-out likelihood: the masked-diffusion NELBO (a perplexity bound) or the AR model's exact NLL.

Both objectives give `eval_terms(model, x0, time_samples, seed) -> EvalTerms (nll per sequence [B], tokens [B],
...)`, deterministic for a seed (stratified mask counts and fixed mask draws), so two evaluations of the same
checkpoint on the same shards agree exactly. The standard error is over sequences (a ratio estimator), so
it covers both the spread of the data and the Monte-Carlo noise of the masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from unmask.eval import EvalError


@dataclass
class LikelihoodResult:
    nats_per_token: float  # NELBO per token (masked diffusion: an upper bound on the NLL) or AR NLL per token
    stderr: float  # standard error of nats_per_token
    perplexity: float  # exp(nats_per_token): a bound for masked diffusion, exact for AR
    perplexity_low: float  # exp(nats_per_token -/+ 1.96 stderr): a 95% interval
    perplexity_high: float
    tokens: int  # tokens scored (AR: L - 1 per sequence, it never predicts the first)
    sequences: int
    # Top-1 accuracy of the predictions scored: masked tokens over all NELBO draws (masking rates spread evenly
    # over (0, 1]), or AR next tokens. Comparable between models of one tokenizer only.
    accuracy: float | None = None
    nats_per_byte: float | None = None  # nats_per_token * tokens / UTF-8 bytes of their text: tokenizer-free

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / math.log(2)

    def to_dict(self) -> dict:
        per_byte = {} if self.nats_per_byte is None else {"bits_per_byte": self.nats_per_byte / math.log(2)}
        return {**asdict(self), "bits_per_token": self.bits_per_token, **per_byte}


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def ratio_with_stderr(nll: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """Sum(nll) / sum(counts) and its delta-method standard error over the m sequences."""
    nll, counts = nll.double(), counts.double()
    ratio = float(nll.sum() / counts.sum())
    m = nll.numel()
    if m < 2:
        return ratio, float("nan")
    residual = nll - ratio * counts  # [m]
    return ratio, math.sqrt(float((residual**2).sum()) / (m * (m - 1))) / float(counts.mean())


@torch.no_grad()
def evaluate_likelihood(model, objective, batches: Iterable[torch.Tensor], time_samples: int = 4,
                        seed: int = 0, max_batches: int | None = None) -> LikelihoodResult:
    """Score token batches [B, L] (or SFT's (tokens, prompt_mask) pairs: the response given the prompt) with
    `objective.eval_terms`; batch i uses mask seed `seed + i`."""
    device = model_device(model)
    nlls, counts, hits, predicted = [], [], 0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x0, prompt_mask = batch if isinstance(batch, tuple) else (batch, None)
        sft = {} if prompt_mask is None else {"prompt_mask": prompt_mask.to(device)}
        terms = objective.eval_terms(model, x0.to(device), time_samples, seed + i, accuracy=True, **sft)
        nlls.append(terms.nll.double().cpu())  # [B]
        counts.append(terms.tokens.cpu())  # [B]
        hits, predicted = hits + int(terms.hits.sum()), predicted + int(terms.predicted.sum())
    if not nlls:
        raise EvalError("likelihood: no batches to score; check the held-out shard directory")
    nll, n = torch.cat(nlls), torch.cat(counts)
    keep = n > 0  # all-padding sequences carry no tokens
    ratio, se = ratio_with_stderr(nll[keep], n[keep])
    half = 1.96 * se if math.isfinite(se) else 0.0
    return LikelihoodResult(ratio, se, math.exp(ratio), math.exp(ratio - half), math.exp(ratio + half),
                            int(n.sum()), int(keep.sum()), hits / max(predicted, 1))
