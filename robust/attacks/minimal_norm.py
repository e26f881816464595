"""When a minimal-norm attack on a stochastic model counts a point as adversarial.

Minimal-norm attacks (C&W, DeepFool, growing FGSM, FAB-T with ``minimal=True``)
search the smallest perturbation whose point the verdict counts as adversarial.
On a stochastic model the verdict takes R fresh draws and counts a minimal-norm
row as a success when fewer than half of them classify the point correctly: the
point lies past the boundary of the majority-vote classifier.  The attacks
decide with the same rule, on their own draws, never with the argmax of the
EOT-mean logits (whose boundary differs from the vote's wherever the logits'
noise is skewed or heavy-tailed, and which one lucky mean can push across):

  * screen: fewer than half of the draws at hand classify the point correctly
    (the EOT gradient's passes at that point, or ``eot_samples`` fresh passes);
  * confirm: on max(``eot_samples``, :data:`MIN_CONFIRM_DRAWS`) fresh draws, so
    few classify the point correctly that a one-sided binomial test rejects
    "a majority of draws is correct" at level :data:`LEVEL` (20 draws: at most
    5 correct).

A point is accepted only when both hold.  The confirming draws took no part in
choosing the candidate, so they judge it as the verdict will; the test guards
against the many chances an attack gets: it screens hundreds of points near the
boundary and keeps the closest accepted one, and a bare majority of the
confirming draws would accept points right at the boundary, where the verdict is
a coin flip (measured: half of growing FGSM's points on a noisy digits model).
The price is a small overshoot past the vote boundary, so the distance is an
upper bound on the vote boundary's, as a minimal-norm attack's always is.
Deterministic models keep the original algorithms' rules; nothing here is called.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from robust.attacks import verdict
from robust.attacks.base import GradientAttack

#: The screen passes a point when the fraction of draws correct is below this.
MAJORITY = 0.5
#: Level of the one-sided binomial test (H0: P(a draw is correct) >= 1/2) that confirms a point.
LEVEL = 0.05
#: Fewest confirming draws: with fewer than 5 no count passes the test at level 0.05.
MIN_CONFIRM_DRAWS = 20

#: (logits of S draws (S, N, K), y (N,)) -> fraction of the draws counted correct (N,).
Correctness = Callable[[Tensor, Tensor], Tensor]


@lru_cache(maxsize=None)
def most_correct_allowed(draws: int, level: float = LEVEL) -> int:
    """The largest k with P(Binomial(draws, 1/2) <= k) <= level: a point with at most k of
    ``draws`` correct is past the vote boundary at that level (-1: no k qualifies)."""
    tail, k = 0.0, -1
    while k + 1 <= draws:
        tail += math.comb(draws, k + 1) / 2.0 ** draws
        if tail > level:
            break
        k += 1
    return k


@torch.no_grad()
def fresh_draws(attack: GradientAttack, model: nn.Module, x: Tensor, draws: Optional[int] = None) -> Tensor:
    """Logits of ``draws`` (default ``attack.eot_samples``) fresh, distinct draws of the model
    on x: (draws, N, K), stacked as the attack's EOT passes are."""
    return verdict.draw_logits(model, x, draws or attack.eot_samples, attack.chunk(x.device)).float()


def confirm(attack: GradientAttack, model: nn.Module, x: Tensor, y: Tensor, screen: Tensor,
            correct: Optional[Correctness] = None) -> Tensor:
    """Which points are accepted as adversarial (N,) bool: ``screen`` (N,), the fraction of
    the draws at hand counted correct, is below :data:`MAJORITY`, and the confirming fresh
    draws (taken only for the points the screen passes) pass the binomial test.

    ``correct`` says what a draw counts as correct (default: its top-1 class is y).
    """
    correct = correct or verdict.correct_fraction
    accepted = screen < MAJORITY
    idx = accepted.nonzero().squeeze(1)
    if idx.numel() > 0:
        draws = max(attack.eot_samples, MIN_CONFIRM_DRAWS)
        k = torch.round(correct(fresh_draws(attack, model, x[idx], draws), y[idx]) * draws)
        accepted[idx] = k <= most_correct_allowed(draws)
    return accepted
