"""Carlini-Wagner L2 (Carlini & Wagner, IEEE S&P 2017, section V.A), with confidence kappa.

A minimal-norm attack: it has no budget.  With the change of variables
x' = (tanh(w) + 1) / 2 (which keeps x' in [0, 1]), it minimises with Adam

    ||x' - x||_2^2 + c * max(Z(x')_y - max_{i != y} Z(x')_i, -kappa)          (eq. of V.A, f_6)

for each of a sequence of constants c found by binary search per example: c
starts at ``initial_const`` and, while no adversarial example has been found
for an example, is multiplied by 10; once one has, c moves to the midpoint of
the bracket.  The result is, per example, the adversarial point of smallest
L2 distance whose margin reaches kappa (max_{i != y} Z_i - Z_y >= kappa).
Learn2Perturb (section 4.2) uses Adam with learning rate 5e-4, up to 1000
iterations, 9 binary-search steps, c in [1e-3, 1e10] and kappa from 0 to 5:
those are the defaults.

Choices where the papers leave room:
  * every binary-search step restarts from w = atanh((2x - 1)(1 - 1e-6)) with a
    fresh Adam state (as in Carlini & Wagner's reference description);
  * a step stops early when the objective has not decreased by 0.01% over the
    last tenth of the iterations (Carlini & Wagner's "abort early");
  * c never exceeds ``max_const`` (1e10, Learn2Perturb's range);
  * with EOT the gradient of the margin term is the mean over ``eot_samples``
    stochastic passes;
  * the kappa test is one pass on a deterministic model (the mean logits of
    ``eot_samples`` identical passes), and each step keeps its closest iterate
    that passes it.  On a stochastic model it is the verdict's rule for
    minimal-norm attacks (:mod:`robust.attacks.minimal_norm`): fewer than half
    of ``eot_samples`` fresh draws have a margin above -kappa, and further fresh
    draws confirm it by a binomial test; never the margin of the EOT-mean
    logits.  Each step
    then runs all its iterations (no abort early: the objective is a noisy
    estimate) and only its final iterate is judged: testing every iterate near
    the boundary and keeping the closest that passes would let the luckiest of
    hundreds of batches of draws decide (measured on a linear model with
    Gaussian input noise: 0-17% of the points so chosen were misclassified by
    a majority of draws, against 96-100% of the final iterates); the binary
    search over c does the minimising;
  * where no adversarial point was found the clean input is returned (the
    attack failed; the protocol records an infinite distance).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS, minimal_norm
from robust.attacks.base import GradientAttack


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Z_y - max_{i != y} Z_i per example (N,): negative when misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return z_y - logits.scatter(1, y[:, None], float("-inf")).max(1).values


class CarliniWagnerL2(GradientAttack):
    """Untargeted C&W L2 with confidence kappa (Carlini & Wagner 2017), unbounded.

    Args:
        kappa: confidence, the margin an adversarial point must reach (0; Learn2Perturb Table 3: 0 to 5);
        steps: Adam iterations per binary-search step (1000, Learn2Perturb 4.2);
        search_steps: binary-search steps over c (9, Learn2Perturb 4.2);
        lr: Adam learning rate (5e-4, Learn2Perturb 4.2);
        initial_const, max_const: the range of c (1e-3 and 1e10, Learn2Perturb 4.2);
        abort_early: stop a binary-search step once the objective stalls;
        seed: accepted for a uniform attack signature (C&W draws nothing);
        eot_samples, eot_chunk: see GradientAttack.
    Stochastic model: each binary-search step runs in full and its final iterate counts as found
    only when a binomial test on fresh draws puts it past the vote boundary (module docstring).
    Shapes: x (N,C,H,W) in [0,1], y (N,) -> x_adv like x (x itself where the attack failed).
    Example: ``CarliniWagnerL2(kappa=5)(model, x, y)``.
    """

    name = "cw-l2"

    def __init__(self, kappa: float = 0.0, steps: int = 1000, search_steps: int = 9, lr: float = 5e-4,
                 initial_const: float = 1e-3, max_const: float = 1e10, abort_early: bool = True,
                 seed: int = 0, eot_samples: int = 1, eot_chunk: Optional[int] = None) -> None:
        super().__init__(eot_samples=eot_samples, eot_chunk=eot_chunk)
        if not kappa >= 0:
            raise ValueError(f"kappa must be >= 0, got {kappa}")
        if steps < 1 or search_steps < 1:
            raise ValueError(f"steps and search_steps must be >= 1, got {steps}, {search_steps}")
        if not (lr > 0 and 0 < initial_const <= max_const):
            raise ValueError(f"need lr > 0 and 0 < initial_const <= max_const, got lr={lr}, "
                             f"initial_const={initial_const}, max_const={max_const}")
        self.kappa, self.steps, self.search_steps, self.lr = float(kappa), steps, search_steps, lr
        self.initial_const, self.max_const, self.abort_early = initial_const, max_const, abort_early

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        const = torch.full((n,), self.initial_const, device=x.device)
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), float("inf"), device=x.device)
        best_dist = torch.full((n,), float("inf"), device=x.device)
        best = x.clone()
        stochastic = self.is_stochastic(model, x)
        for _ in range(self.search_steps):
            x_found, dist, success = self._minimise(model, x, y, const, stochastic)
            better = success & (dist < best_dist)
            best[better], best_dist[better] = x_found[better], dist[better]
            # Binary search (per example): success -> smaller c, failure -> larger c.
            upper = torch.where(success, torch.minimum(upper, const), upper)
            lower = torch.where(success, lower, torch.maximum(lower, const))
            bracketed = torch.isfinite(upper)
            const = torch.where(bracketed, (lower + upper) / 2, const * 10).clamp(max=self.max_const)
        return best

    def _minimise(self, model: nn.Module, x: Tensor, y: Tensor,
                  const: Tensor, stochastic: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """One binary-search step: Adam on w for fixed c.

        Returns the smallest-distance point reaching the kappa margin (N, ...) (on a
        stochastic model: for a confirmed majority of draws), its L2 distance (N,), inf
        where none, and whether one was found (N,).
        """
        n = x.shape[0]
        w = torch.atanh((2 * x - 1) * (1 - 1e-6)).detach().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=self.lr)
        best_dist = torch.full((n,), float("inf"), device=x.device)
        best = x.clone()
        previous = float("inf")
        check_every = max(self.steps // 10, 1)
        for step in range(self.steps):
            x_adv = (torch.tanh(w) + 1) / 2
            dist_sq = (x_adv - x).flatten(1).pow(2).sum(1)
            margin_grad, hinge, logits = self._margin_term(model, x_adv.detach(), y, const)
            optimizer.zero_grad()
            # d/dw of ||x' - x||^2 + c f(x'): the hinge part through its EOT gradient in x'.
            (dist_sq.sum() + (x_adv * margin_grad).sum()).backward()
            optimizer.step()
            if stochastic:  # only the final iterate is judged (module docstring)
                continue
            reached = margin(logits, y) <= -self.kappa
            dist = dist_sq.detach().sqrt()
            better = reached & (dist < best_dist)
            best[better], best_dist[better] = x_adv.detach()[better], dist[better]
            if self.abort_early and step % check_every == check_every - 1:
                objective = (dist_sq.detach() + hinge).sum().item()
                if objective > previous * 0.9999:
                    break
                previous = objective
        if stochastic:
            final = ((torch.tanh(w) + 1) / 2).detach()
            screen = self._short_of_kappa(minimal_norm.fresh_draws(self, model, final), y)
            found = minimal_norm.confirm(self, model, final, y, screen, self._short_of_kappa)
            best[found], best_dist[found] = final[found], (final - x).flatten(1).norm(dim=1)[found]
        return best, best_dist, torch.isfinite(best_dist)

    def _margin_term(self, model: nn.Module, x_adv: Tensor, y: Tensor,
                     const: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """EOT gradient in x' of c * max(margin, -kappa), its value (N,) and the mean logits (N, K)."""
        n, logit_sums = x_adv.shape[0], []

        def hinge(logits: Tensor, ys: Tensor) -> Tensor:
            logit_sums.append(logits.detach().float().view(-1, n, logits.shape[1]).sum(0))
            copies = logits.shape[0] // n
            return const.repeat(copies) * torch.clamp(margin(logits, ys), min=-self.kappa)

        grad, value = self.loss_and_gradient(model, x_adv, y, hinge)
        return grad, value, torch.stack(logit_sums).sum(0) / self.eot_samples

    def _short_of_kappa(self, logits: Tensor, y: Tensor) -> Tensor:
        """Fraction of the draws (S, N, K) whose margin stays above -kappa (N,): the draws
        the point does not fool with confidence kappa."""
        s, n = logits.shape[:2]
        return (margin(logits.flatten(0, 1), y.repeat(s)) > -self.kappa).float().view(s, n).mean(0)


@ATTACKS.register("cw-l2")
def _cw_l2(**kwargs) -> CarliniWagnerL2:
    return CarliniWagnerL2(**kwargs)
