"""Per-row verdict scores, recomputed from the stored counts.

Every attack row stores ``draws`` (R, the fresh draws of the model the verdict
took) and ``draws_correct`` (k of them classified the row's input correctly).
The row's score is k / R: 0 or 1 for a deterministic model (R = 1), a fraction
for a stochastic one.  A row that was not attacked (``draws`` = 0: a cascade
skipped an example an earlier attack had already broken) scores 0, the score
that broke it.  Rows written before schema 4 have no counts: their score is
their single-draw ``correct`` (R = 1), which is what they measured.

Rules on top of the score (README, "Robust accuracy of stochastic models"):
an example's robust score is the minimum over clean and every bounded attack;
an attack's accuracy is the mean over examples of min(clean score, attack
score), so an example misclassified when clean never counts as robust; the
majority-vote rule uses ``vote_correct`` in the same way.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

SCORE = "score"


def with_scores(table: pa.Table) -> pa.Table:
    """``table`` plus a float64 column ``score`` (see the module docstring)."""
    correct = table["correct"].cast(pa.float64())
    if "draws" not in table.column_names:
        return table.append_column(SCORE, correct)
    draws = table["draws"].cast(pa.float64())
    k = table["draws_correct"].cast(pa.float64())
    measured = pc.if_else(pc.greater(draws, 0), pc.divide(k, pc.max_element_wise(draws, 1.0)), 0.0)
    return table.append_column(SCORE, pc.if_else(pc.is_null(draws), correct, measured))
