"""FGSM with eps grown until the prediction changes (Foolbox's FGSM, used by the SDR paper).

SDR (section 2.1): "A common implementation of the FGSM attack is to
gradually increase the magnitude of eps until the input is misclassified."
Foolbox's gradient-sign attack computes sign(grad_x L(x, y)) once and tries
eps = max_eps * k / steps for k = 1, 2, ..., steps (1000 values up to 1), and
keeps the first x + eps sign(grad), clipped to [0, 1], that is misclassified.
So this is a minimal-norm attack along one direction: it has no budget, and
the L-inf size of its result is the smallest eps on the grid that fools the
model (the evaluation's ``distance`` column).

Choices: the gradient is the EOT mean over ``eot_samples`` stochastic passes;
where no eps up to ``max_eps`` fools the model the clean input is returned (the
attack failed).  "Misclassified" is one pass on a deterministic model (the mean
of ``eot_samples`` identical passes); on a stochastic model it is the verdict's
rule for minimal-norm attacks (:mod:`robust.attacks.minimal_norm`): fewer than
half of ``eot_samples`` fresh draws classify the point correctly, and further
fresh draws confirm it by a binomial test; never the argmax of the EOT-mean
logits.  An eps that passes the first batch but not the confirmation does not
stop the search: the grid goes on.  The search ends at the first confirmed eps,
since along one direction no later grid point can be smaller.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS, minimal_norm, verdict
from robust.attacks.base import GradientAttack


class GrowingFGSM(GradientAttack):
    """The smallest eps on a grid at which the FGSM step fools the model (L-inf, unbounded).

    Args:
        steps: grid size (1000, Foolbox's default); max_eps: the largest eps tried (1.0);
        seed: accepted for a uniform attack signature; eot_samples, eot_chunk: see GradientAttack.
    Stochastic model: an eps fools the model when a binomial test on fresh draws puts the point
    past the vote boundary, not when the EOT-mean logits say so (module docstring).
    Shapes: x (N,C,H,W) in [0,1], y (N,) -> x_adv like x (x itself where no eps fooled the model).
    Example: ``GrowingFGSM()(model, x, y)``.
    """

    name = "fgsm-grow"

    def __init__(self, steps: int = 1000, max_eps: float = 1.0, seed: int = 0, eot_samples: int = 1,
                 eot_chunk: Optional[int] = None) -> None:
        super().__init__(eot_samples=eot_samples, eot_chunk=eot_chunk)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0 < max_eps <= 1:
            raise ValueError(f"max_eps must be in (0, 1], got {max_eps}")
        self.steps, self.max_eps = steps, float(max_eps)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        direction = self.input_gradient(model, x, y).sign()
        stochastic = self.is_stochastic(model, x)
        x_adv = x.clone()
        todo = ~self._fooled(model, x, y, stochastic)  # already misclassified: eps 0
        for k in range(1, self.steps + 1):
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            eps = self.max_eps * k / self.steps
            candidate = torch.clamp(x[idx] + eps * direction[idx], 0.0, 1.0)
            fooled = self._fooled(model, candidate, y[idx], stochastic)
            x_adv[idx[fooled]] = candidate[fooled]
            todo[idx[fooled]] = False
        return x_adv

    @torch.no_grad()
    def _fooled(self, model: nn.Module, x: Tensor, y: Tensor, stochastic: bool) -> Tensor:
        if stochastic:  # a majority of fresh draws misclassifies x, confirmed on further draws
            screen = verdict.correct_fraction(minimal_norm.fresh_draws(self, model, x), y)
            return minimal_norm.confirm(self, model, x, y, screen)
        logits = sum(model(x).float() for _ in range(self.eot_samples)) / self.eot_samples
        return logits.argmax(1) != y


@ATTACKS.register("fgsm-grow")
def _fgsm_grow(**kwargs) -> GrowingFGSM:
    return GrowingFGSM(**kwargs)
