"""Robustness scores of the Tibo-Jaeger-Larsen framework, for any trained model.

* R2 (:mod:`robust.scores.r2`): the average margin, from FGSM, PGD and a
  minimal-distance attack moved to the boundary by binary search (eq. 14).
* R4 (:mod:`robust.scores.r4`): on-manifold average-case agreement over
  autoencoder samples (:mod:`robust.scores.autoencoder`), 1/eps weighted.

Pure PyTorch; the Ray sharding lives in ``cluster/scores.py``.
"""
from robust.scores.boundary import Boundary, boundary_search
from robust.scores.r2 import R2Config, check_eps_grid, margin_area, margin_curve, r2_margins
from robust.scores.r4 import R4Config, r4_from_agreement, r4_scores

#: Score names accepted by the scoring CLI.
SCORES = ("r2", "r4")


def check_scores(names) -> list:
    """The requested score names; ValueError naming the valid choices otherwise."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no score given; valid choices: {', '.join(SCORES)}")
    for n in names:
        if n not in SCORES:
            raise ValueError(f"unknown score {n!r}; valid choices: {', '.join(SCORES)}")
    return list(dict.fromkeys(names))


__all__ = ["Boundary", "R2Config", "R4Config", "SCORES", "boundary_search", "check_eps_grid", "check_scores",
           "margin_area", "margin_curve", "r2_margins", "r4_from_agreement", "r4_scores"]
