"""Minimal-norm attacks in the summary: success within budgets and median distance.

Minimal-norm attacks (CW, DeepFool, growing FGSM, FAB-T-min) are unbounded, so
they stay out of the accuracy tables and the worst case; their rows hold the
distance of the closest adversarial point found.  A row counts as found where
its verdict score is below 1/2 (misclassified; on a stochastic model, by the
majority of the verdict's draws: :mod:`robust.results.verdict`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from robust.evaluation.suite import is_minimal_norm, spec_of_label
from robust.results.schema import read_kind
from robust.results.verdict import SCORE, with_scores


#: Budgets at which the success rate of minimal-norm attacks is shown, per norm (overridable).
MINIMAL_NORM_BUDGETS = {"linf": (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.1, 0.2, 0.3),
                        "l2": (0.1, 0.25, 0.5, 1.0, 2.0)}


def parse_budgets(items: Sequence[str]) -> Dict[str, Tuple[float, ...]]:
    """The default budgets, with 'NORM=B1,B2,...' items replacing a norm's budgets."""
    budgets = dict(MINIMAL_NORM_BUDGETS)
    for item in items:
        norm, _, values = (part.strip() for part in item.partition("="))
        if norm not in MINIMAL_NORM_BUDGETS:
            raise ValueError(f"--budgets {item!r}: unknown norm {norm!r}; valid choices: "
                             f"{', '.join(MINIMAL_NORM_BUDGETS)}")
        try:
            budgets[norm] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--budgets {item!r} is not NORM=B1,B2,... with numbers") from None
    return budgets


def minimal_norm_points(fs: pafs.FileSystem, root: str) -> List[dict]:
    """Per (trial, minimal-norm attack): its norm and the distances of its attacked rows
    (inf where it found no adversarial point; only rows whose verdict score is below 1/2,
    i.e. misclassified, or misclassified by the majority of a stochastic model's draws,
    count as found)."""
    attacks = read_kind(fs, root, "attack")
    if attacks.num_rows == 0:
        return []
    labels = [a for a in set(attacks["attack"].to_pylist()) if is_minimal_norm(a)]
    if not labels:
        return []
    rows = with_scores(attacks.filter(pc.and_(pc.is_in(attacks["attack"], pa.array(labels)),
                                              pc.equal(attacks["attacked"], True))))
    out: Dict[Tuple[str, str], List[float]] = {}
    # found = the verdict's majority misclassifies the returned point (deterministic: misclassified)
    for t, a, score, d in zip(*rows.select(["trial", "attack", SCORE, "distance"]).to_pydict().values()):
        out.setdefault((t, a), []).append(math.inf if score >= 0.5 or d is None or math.isnan(d) else d)
    return [{"trial": t, "attack": a, "norm": spec_of_label(a).norm, "distances": sorted(d)}
            for (t, a), d in sorted(out.items())]


def minimal_norm_rows(points: Sequence[dict], names: Dict[str, str], norm: str,
                      budgets: Sequence[float]) -> Tuple[List[str], List[List[str]]]:
    """Minimal-norm attacks of one norm: examples attacked, overall success [%], median
    distance (inf counts for a failure), and success [%] at each budget (distance <= budget)."""
    header = ["model", "attack", "n", "success [%]", f"median {norm} distance"] + \
        [f"<= {b:.4g} [%]" for b in budgets]
    rows = []
    for p in points:
        if p["norm"] != norm:
            continue
        d = p["distances"]
        n = len(d)
        median = (d[(n - 1) // 2] + d[n // 2]) / 2
        rows.append([names.get(p["trial"], p["trial"]), p["attack"], str(n),
                     f"{100 * sum(math.isfinite(v) for v in d) / n:.2f}", f"{median:.4g}"]
                    + [f"{100 * sum(v <= b for v in d) / n:.2f}" for b in budgets])
    return header, rows
