"""Moving an adversarial point back to the decision boundary (Tibo et al., eq. 14).

For an input x with label c = f(x) and an adversarial point x' (f(x') != c),

    eps_x' = min{ t in [0, 1] : f(x + t (x' - x)) != f(x) }              (14)

is estimated by bisection on the segment, under the paper's assumption of one
decision boundary between x and x'.  The bracket [lo, hi] always has the model
keep the label at x + lo (x' - x) and change it at x + hi (x' - x): the initial
bracket [0, 1] is verified by evaluating the model at both ends, and every
bisection step keeps the invariant.  Segments whose ends do not bracket a label
change (the attack failed) are marked invalid.  The returned boundary point is
the ``hi`` end, so it is adversarial by construction; its distance to x is the
margin estimate, exact to within ``tol`` (in the L2 norm of the segment).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class Boundary(NamedTuple):
    """Result of :func:`boundary_search` for a batch of N segments.

    valid: (N,) bool, the ends of the segment bracket a label change;
    lo, hi: (N,) float, the final bracket (fractions of the segment; 0, 1 where invalid);
    point: like x, x + hi (x' - x) (x itself where invalid);
    distance: (N,) float, ||point - x||_2 (inf where invalid).
    """

    valid: Tensor
    lo: Tensor
    hi: Tensor
    point: Tensor
    distance: Tensor


def _along(x: Tensor, direction: Tensor, t: Tensor) -> Tensor:
    return x + t.view(-1, *([1] * (x.dim() - 1))) * direction


@torch.no_grad()
def boundary_search(model: nn.Module, x: Tensor, x_adv: Tensor, labels: Tensor, tol: float = 1e-3) -> Boundary:
    """Bisection for eq. (14) on every segment x -> x_adv of a batch.

    Args: model: returns logits; x, x_adv: (N, C, H, W); labels: (N,) f(x), the label to leave;
    tol: L2 length of the final bracket (the distance is exact to within it).
    The model is evaluated in its current mode (callers put it in eval mode).
    """
    if not tol > 0:
        raise ValueError(f"binary search tolerance must be > 0, got {tol}")
    direction = x_adv - x
    length = direction.flatten(1).norm(dim=1)
    n = x.shape[0]
    lo = torch.zeros(n, device=x.device, dtype=x.dtype)
    hi = torch.ones(n, device=x.device, dtype=x.dtype)
    keeps_at_x = model(x).argmax(1) == labels
    changes_at_end = model(x_adv).argmax(1) != labels
    valid = keeps_at_x & changes_at_end & (length > 0)
    longest = float(length[valid].max()) if bool(valid.any()) else 0.0
    steps = max(0, math.ceil(math.log2(longest / tol))) if longest > tol else 0
    for _ in range(steps):
        mid = (lo + hi) / 2
        changed = model(_along(x, direction, mid)).argmax(1) != labels
        hi = torch.where(changed, mid, hi)
        lo = torch.where(changed, lo, mid)
    hi = torch.where(valid, hi, torch.ones_like(hi))
    lo = torch.where(valid, lo, torch.zeros_like(lo))
    point = torch.where(valid.view(-1, *([1] * (x.dim() - 1))), _along(x, direction, hi), x)
    distance = torch.where(valid, hi * length, torch.full_like(length, math.inf))
    return Boundary(valid, lo, hi, point, distance)
