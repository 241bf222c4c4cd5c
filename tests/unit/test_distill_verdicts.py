"""The distillation table's summary over sample sets, and the comparisons it states only when every set agrees."""

import math

import pytest

from unmask.distill.evaluate import format_table, summarise, verdicts


def sets(*ppl):
    return [{"gen_ppl": p, "gen_bits_per_byte": 1.0, "unigram_entropy": 4.0, "seconds": 1.0, "nfe": 8,
             "example": "x"} for p in ppl]


def table(student16, teacher16, student8=None, teacher1024=None):
    rows = [summarise("teacher", 16, sets(*teacher16)), summarise("student", 16, sets(*student16))]
    if student8:
        rows += [summarise("teacher", 1024, sets(*teacher1024)), summarise("student", 8, sets(*student8))]
    return {"rows": rows}


def test_summary_is_mean_and_sample_sd_over_sets():
    row = summarise("student", 16, sets(100.0, 110.0, 120.0))
    assert row["gen_ppl"] == pytest.approx(110.0) and row["gen_ppl_sd"] == pytest.approx(10.0)
    assert row["gen_ppl_sets"] == [100.0, 110.0, 120.0] and row["steps"] == 16
    assert math.isnan(summarise("student", 16, sets(100.0))["gen_ppl_sd"])


def test_a_win_counts_only_beyond_the_spread_and_ratios_per_set():
    clear = verdicts(table([100, 102, 98], [130, 128, 133], student8=[120, 118, 124], teacher1024=[100, 99, 101]))
    assert clear[0].startswith("student@16 below teacher@16 in 3/3 sets") and clear[0].endswith("holds")
    assert clear[1].endswith("within 25% in every set")
    noisy = verdicts(table([100, 140, 90], [120, 110, 130], student8=[130, 100, 100], teacher1024=[100, 100, 100]))
    assert "in 2/3 sets" in noisy[0] and noisy[0].endswith("does not hold")
    assert noisy[1].endswith("not within 25% in every set")  # 1.30 in the first set
    assert verdicts({"rows": [summarise("teacher", 16, sets(1.0))]}) == []  # rows missing: nothing stated
    assert "holds" in format_table(table([100, 102, 98], [130, 128, 133]))
