"""Unigram entropy and distinct-n against hand-computed values."""

import math

import pytest

from unmask.eval.diversity import distinct_n, diversity, entropy, unigram_entropy


def test_entropy_of_known_distributions():
    assert entropy([7] * 10) == 0.0
    assert entropy(list(range(16))) == pytest.approx(math.log(16))
    assert entropy("aab") == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert unigram_entropy([[1, 2], [3, 3], []]) == pytest.approx(math.log(2) / 2)  # empty sample skipped


def test_distinct_n():
    samples = [[1, 2, 3, 1, 2], [1, 2]]
    assert distinct_n(samples, 1) == 3 / 7
    assert distinct_n(samples, 2) == 3 / 5  # (1,2) x3, (2,3), (3,1)
    assert distinct_n([[1]], 2) == 0.0


def test_collapse_is_detected():
    varied = [[(i * 7 + j * 13) % 101 for j in range(50)] for i in range(8)]
    collapsed = [[5, 6] * 25 for _ in range(8)]
    d_varied, d_collapsed = diversity(varied), diversity(collapsed)
    for key in ("unigram_entropy", "pooled_unigram_entropy", "distinct_1", "distinct_2", "distinct_4"):
        assert d_collapsed[key] < d_varied[key], key
