"""R2, the average margin (Tibo et al., Example 2, eqs. 10, 11 and 14, section 5).

R2 = int_X mu^f(x) p(x) dx (eq. 10) ~ (1/N) sum_i mu^f(x_i) (eq. 11), mu^f(x)
the L2 distance from x to the decision boundary of f.  It is estimated from
above as in section 5: for each test example, adversarial points from FGSM, PGD
and a minimal-distance gradient attack are moved back to the boundary by the
binary search of eq. (14) (:mod:`robust.scores.boundary`) and the closest of
them is kept; which attack gave it is recorded (Table 2).

Choices the paper leaves open, and ours:

* The score is label-agnostic (type 2): the attacks leave the *predicted*
  label f(x), not the true one, and misclassified examples are scored too.
* Distances are L2 (the metric of Figure 3).  FGSM and PGD are the usual
  L-inf attacks; only their direction matters, since the binary search
  brings their points back along the segment.  Each runs over a ladder of
  budgets eps_data * ``budget_factors`` (1, 2, 4, 8, capped at 1): an example
  takes the smallest budget that changes its label.  PGD-``pgd_steps`` uses
  the default step 2.5 * eps / steps and a random start seeded by the caller.
* The minimal-distance attack is DeepFool (L2, Moosavi-Dezfooli et al. 2016;
  ``robust.attacks.deepfool``) in place of the paper's BG (Hein &
  Andriushchenko 2017), which we do not have: both look for the closest point
  of another class rather than the most damaging point within a budget.
* An example for which no attack changes the label gets the margin d = sqrt(m),
  the diameter of the unit hypercube: the value of eq. (5) when no boundary
  lies within X.  Such rows are marked ``found = False``.
* The margin curve (Figure 4) is P(mu > eps) over the examples as a function
  of eps; its area over [0, d] equals the mean margin exactly (the empirical
  survival function integrates to the mean of min(mu, d), and mu <= d).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from robust.attacks import create_attack
from robust.attacks.fgsm import FGSM
from robust.attacks.pgd import PGD
from robust.scores.boundary import boundary_search

#: The attacks of section 5, in the order their distances are reported.
R2_ATTACKS = ("fgsm", "pgd", "deepfool")


@dataclass(frozen=True)
class R2Config:
    """budget_factors: FGSM/PGD budgets as multiples of eps_data (tried in order, capped at 1);
    pgd_steps: n of PGD-n (20); minimal_steps: iterations of DeepFool (50, its default);
    tol: L2 tolerance of the binary search (1e-3)."""

    budget_factors: Tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    pgd_steps: int = 20
    minimal_steps: int = 50
    tol: float = 1e-3

    def __post_init__(self) -> None:
        if not self.budget_factors or any(not f > 0 for f in self.budget_factors):
            raise ValueError(f"r2 budget_factors must be a non-empty list of values > 0, got {self.budget_factors}")
        if self.pgd_steps < 1 or self.minimal_steps < 1:
            raise ValueError(f"r2 pgd_steps and minimal_steps must be >= 1, got {self.pgd_steps}, "
                             f"{self.minimal_steps}")
        if not self.tol > 0:
            raise ValueError(f"r2 tol must be > 0, got {self.tol}")


def diameter(x: Tensor) -> float:
    """d = sqrt(m), the L2 diameter of the unit hypercube [0,1]^m of one example of ``x``."""
    return math.sqrt(x[0].numel())


def _laddered(make, model: nn.Module, x: Tensor, labels: Tensor, budgets: Sequence[float]) -> Tensor:
    """Each example's point from the smallest budget whose attack changes its label
    (the largest budget's point where none does)."""
    out = x.clone()
    todo = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for budget in budgets:
        idx = todo.nonzero().flatten()
        if idx.numel() == 0:
            break
        x_adv = make(budget)(model, x[idx], labels[idx])
        out[idx] = x_adv
        with torch.no_grad():
            todo[idx] = model(x_adv).argmax(1) == labels[idx]
    return out


def adversarial_points(model: nn.Module, x: Tensor, labels: Tensor, eps_data: float, config: R2Config,
                       seed: int) -> Dict[str, Tensor]:
    """{attack: its adversarial points for ``x``} for the three attacks of section 5."""
    budgets = sorted({min(1.0, eps_data * f) for f in config.budget_factors})
    return {
        "fgsm": _laddered(lambda e: FGSM(eps=e), model, x, labels, budgets),
        "pgd": _laddered(lambda e: PGD(eps=e, steps=config.pgd_steps, seed=seed), model, x, labels, budgets),
        "deepfool": create_attack("deepfool", steps=config.minimal_steps)(model, x, labels),
    }


def r2_margins(model: nn.Module, x: Tensor, eps_data: float, config: R2Config = R2Config(),
               seed: int = 0) -> Dict[str, object]:
    """Per-example margins of one batch (eq. 14, closest of the three attacks).

    Returns {"prediction": (N,), "margin": (N,), "found": (N,) bool,
    "closest": list of N attack names ('' where none found),
    "distance_<attack>": (N,) boundary distance per attack (inf where it failed)}.
    The model is used in eval mode and restored.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            labels = model(x).argmax(1)
        points = adversarial_points(model, x, labels, eps_data, config, seed)
        dists = torch.stack([boundary_search(model, x, points[a], labels, config.tol).distance
                             for a in R2_ATTACKS], dim=1)                       # (N, attacks)
    finally:
        model.train(was_training)
    best, which = dists.min(dim=1)
    found = torch.isfinite(best)
    margin = torch.where(found, best, torch.full_like(best, diameter(x)))
    out: Dict[str, object] = {"prediction": labels, "margin": margin, "found": found,
                              "closest": [R2_ATTACKS[int(w)] if bool(f) else "" for w, f in zip(which, found)]}
    for j, a in enumerate(R2_ATTACKS):
        out[f"distance_{a}"] = dists[:, j]
    return out


def check_eps_grid(grid: Sequence[float]) -> List[float]:
    """The eps values of a curve, sorted; ValueError when empty, negative or not finite."""
    values = [float(e) for e in grid]
    if not values:
        raise ValueError("eps grid is empty; give at least one eps value >= 0")
    bad = [e for e in values if not (math.isfinite(e) and e >= 0)]
    if bad:
        raise ValueError(f"eps grid values must be finite and >= 0, got {bad[0]}")
    return sorted(values)


def margin_curve(margins: Sequence[float], grid: Sequence[float]) -> List[float]:
    """P(mu > eps) over the examples for each eps of ``grid`` (Figure 4's margin curves)."""
    grid = check_eps_grid(grid)
    m = [float(v) for v in margins]
    if not m:
        raise ValueError("margin curve of no examples")
    return [sum(v > e for v in m) / len(m) for e in grid]


def margin_area(margins: Sequence[float], eps_max: float) -> float:
    """Area under the margin curve over [0, eps_max]: exactly mean(min(mu, eps_max)).

    With eps_max = d (the paper's integral over [0, d]) this is the R2 score."""
    if not eps_max > 0:
        raise ValueError(f"eps_max must be > 0, got {eps_max}")
    m = [float(v) for v in margins]
    if not m:
        raise ValueError("margin area of no examples")
    return sum(min(v, eps_max) for v in m) / len(m)
