"""PGD-n in L-inf and L2 (Madry et al. 2018), with random start, restarts and EOT."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS
from robust.attacks.base import GradientAttack, threat_model
from robust.attacks.verdict import better


class PGD(GradientAttack):
    """Projected gradient ascent on the cross-entropy inside the eps-ball of ``norm``.

    Each of ``steps`` iterations takes a steepest-ascent step of ``step_size``
    (signed gradient for L-inf, normalised gradient for L2) and projects back
    onto the ball and [0,1].  With ``restarts`` > 1, each
    restart begins at a fresh random point and an example keeps the first
    restart that misclassifies it.

    On a stochastic model (forward passes differ; :mod:`robust.attacks.verdict`)
    one misclassified draw decides nothing: every restart runs on every example,
    and each example keeps the point, over all iterates of all restarts, with
    the lowest fraction of its EOT draws classified correctly (ties: the higher
    EOT loss).  The scores come from the passes that give the gradients; the
    last iterate of a run is evaluated once more.

    Args:
        eps: budget; norm: 'linf' or 'l2'; step_size: per-step size (2/255 for CIFAR-10 in the
            constant-perturbation paper, section 3); steps: n of PGD-n;
        random_start: start uniformly inside the ball (Madry et al.);
        restarts: number of random restarts; seed: seeds the random starts.
        eot_samples, eot_chunk: see GradientAttack.
    Shapes: x (N,C,H,W) in [0,1], y (N,) -> x_adv like x.
    Example: ``PGD(eps=8/255, step_size=2/255, steps=20)(model, x, y)``.
    """

    name = "pgd"

    def __init__(self, eps: float, norm: str = "linf", step_size: Optional[float] = None, steps: int = 20,
                 random_start: bool = True, restarts: int = 1, seed: int = 0,
                 eot_samples: int = 1, eot_chunk: Optional[int] = None) -> None:
        super().__init__(eot_samples=eot_samples, eot_chunk=eot_chunk)
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
        self.ball = threat_model(norm, eps)
        self.norm = norm
        # Default step: 2.5 * eps / steps (Madry et al.), so the iterate can cross the ball.
        self.step_size = step_size if step_size is not None else 2.5 * eps / steps
        self.steps = steps
        self.random_start = random_start
        self.restarts = restarts
        self.seed = seed

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        if self.is_stochastic(model, x):
            return self._best_over_runs(model, x, y, generator)
        if self.restarts == 1:  # nothing to choose between: no extra forward pass
            return self._run(model, x, y, generator)
        best = self._run(model, x, y, generator)
        with torch.no_grad():
            fooled = model(best).argmax(1) != y
        for _ in range(self.restarts - 1):
            if bool(fooled.all()):
                break
            x_adv = self._run(model, x, y, generator)
            with torch.no_grad():
                now_fooled = model(x_adv).argmax(1) != y
            take = now_fooled & ~fooled  # an example keeps the first restart that fools it
            best[take] = x_adv[take]
            fooled |= now_fooled
        return best

    def _best_over_runs(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """Stochastic models: per example the best iterate of every restart by the verdict's rule."""
        best = x.clone()
        score = torch.full((x.shape[0],), float("inf"), device=x.device)
        loss = torch.full_like(score, float("-inf"))
        shape = (-1,) + (1,) * (x.dim() - 1)
        for _ in range(self.restarts):
            x_adv = self.ball.random_start(x, generator) if self.random_start else x.clone()
            for step in range(self.steps + 1):
                grad, loss_now, score_now, _ = self.loss_gradient_score(model, x_adv, y, self.loss_fn)
                take = better(score_now, loss_now, score, loss)
                best = torch.where(take.view(shape), x_adv, best)
                score, loss = torch.where(take, score_now, score), torch.where(take, loss_now, loss)
                if step < self.steps:
                    x_adv = self.ball.project(self.ball.step(x_adv, grad, self.step_size), x)
        return best

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        x_adv = self.ball.random_start(x, generator) if self.random_start else x.clone()
        for _ in range(self.steps):
            grad = self.input_gradient(model, x_adv, y)
            x_adv = self.ball.project(self.ball.step(x_adv, grad, self.step_size), x)
        return x_adv


@ATTACKS.register("pgd")
def _pgd(eps: float, **kwargs) -> PGD:
    return PGD(eps=eps, **kwargs)
