"""Weighted mixtures of sources: which source each global sample position draws from.

Rule. Position g (counted over the whole run, all ranks: step * global_batch + rank * batch + j) draws from the
source whose cumulative-weight interval holds u_g = frac(offset + (g + 1) * phi), phi the golden ratio's
fractional part. This is a low-discrepancy (Weyl) sequence: in every window of n consecutive positions each
source's count differs from n * weight by O(log n), not O(sqrt n) as with random draws. The choice depends on g
only, so every layout with the same global batch draws the same sources at every step, and a resume continues
the sequence. Each source then serves its draws from its own dealt shard stream (plan.py).
"""

from __future__ import annotations

import numpy as np

PHI = 0.6180339887498949


class Blend:
    def __init__(self, weights: list[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        self.k = len(w)
        self.edges = np.cumsum(w / w.sum())[:-1]
        self.offset = (seed * 0.7548776662466927) % 1.0

    def sources(self, g: np.ndarray) -> np.ndarray:
        """Source index of each global position."""
        if self.k == 1:
            return np.zeros(len(g), dtype=np.int64)
        u = (self.offset + (np.asarray(g, dtype=np.float64) + 1.0) * PHI) % 1.0
        return np.searchsorted(self.edges, u, side="right").astype(np.int64)

    def counts(self, g: np.ndarray) -> np.ndarray:
        """How many of these positions draw from each source."""
        return np.bincount(self.sources(g), minlength=self.k)
