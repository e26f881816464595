"""Deterministic models keep their evaluation rows: the verdict rules for stochastic models
(issue 14) change nothing for a model whose forward passes agree.

``tests/golden/deterministic_rows.json`` holds the rows of a fixed evaluation (every attack
family, both protocols) as computed by the code from before those rules; this test
evaluates the same job now and requires every row to be the same.
"""
from __future__ import annotations

import json
import math

import pytest

from golden_rows import COLUMNS, GOLDEN, evaluate


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        if math.isnan(a) and math.isnan(b):
            return True
        return a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


@pytest.mark.parametrize("protocol", ["independent", "cascade"])
def test_deterministic_rows_unchanged(protocol):
    golden = json.loads(GOLDEN.read_text())[protocol]
    now = evaluate(protocol)
    assert set(now) == set(golden)
    for label, cols in golden.items():
        for column in COLUMNS:
            old, new = cols[column], now[label][column]
            assert len(old) == len(new), (label, column)
            diffs = [i for i, (a, b) in enumerate(zip(old, new)) if not _same(a, b)]
            assert not diffs, f"{label}.{column} differs at rows {diffs[:5]}: {[old[i] for i in diffs[:5]]} -> " \
                              f"{[new[i] for i in diffs[:5]]}"
