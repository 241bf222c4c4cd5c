"""Evaluation metrics: held-out likelihood (likelihood.py), generative perplexity under a reference causal LM
(genppl.py), diversity of samples (diversity.py), sampling speed (speed.py), the quality-vs-steps plot
(plot.py) and a run's training curves (curves.py); api.py composes them for
`unmask eval` and distillation. Each module imports only what it needs, so `import unmask.eval.diversity` stays
cheap."""

from unmask.errors import UnmaskError


class EvalError(UnmaskError, ValueError):
    """An evaluation input that cannot work (no data, a missing reference model): names it and the fix."""
