"""bench/distill_compare.py's table assembly: each method's verdicts come from its own rows only, by
unmask.distill.evaluate.verdicts, and the table lists teacher before student, by steps, within a method."""

import importlib.util
from pathlib import Path

from unmask.distill.evaluate import summarise

ROOT = Path(__file__).resolve().parents[2]


def bench():
    spec = importlib.util.spec_from_file_location("distill_compare", ROOT / "bench" / "distill_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sets(*ppl):
    return [{"nfe": 8, "example": "", "gen_ppl": p, "gen_bits_per_byte": 1.0, "unigram_entropy": 3.0,
             "seconds": 1.0} for p in ppl]


def rows(method, student16, teacher16, student8, teacher1024):
    made = [summarise("teacher", 16, sets(*teacher16)), summarise("student", 16, sets(*student16)),
            summarise("student", 8, sets(*student8)), summarise("teacher", 1024, sets(*teacher1024))]
    return [{"method": method, **r} for r in made]


def test_verdicts_per_method_and_table_order():
    b = bench()
    table = (rows("duo+dcd", [50, 51, 52], [100, 101, 102], [60, 61, 62], [55, 55, 55])
             + rows("mdlm+sdtt", [100, 90, 110], [100, 101, 102], [90, 90, 90], [55, 55, 55]))
    found = b.method_verdicts(table)
    assert list(found) == ["duo+dcd", "mdlm+sdtt"]
    assert found["duo+dcd"][0].endswith("holds") and "3/3 sets" in found["duo+dcd"][0]
    assert found["duo+dcd"][1].endswith("within 25% in every set")
    assert found["mdlm+sdtt"][0].endswith("does not hold")
    assert found["mdlm+sdtt"][1].endswith("not within 25% in every set")
    lines = b.format_table(table).splitlines()[2:]
    assert [(line.split(" | ")[1], int(line.split(" | ")[2])) for line in lines[:4]] == [
        ("teacher", 16), ("teacher", 1024), ("student", 8), ("student", 16)]
    assert "51.0 +- 1.0" in lines[3]
