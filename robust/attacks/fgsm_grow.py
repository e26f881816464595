"""FGSM with eps grown until the prediction changes (Foolbox's FGSM, used by the SDR paper).

SDR (section 2.1): "A common implementation of the FGSM attack is to
gradually increase the magnitude of eps until the input is misclassified."
Foolbox's gradient-sign attack computes sign(grad_x L(x, y)) once and tries
eps = max_eps * k / steps for k = 1, 2, ..., steps (1000 values up to 1), and
keeps the first x + eps sign(grad), clipped to [0, 1], that is misclassified.
So this is a minimal-norm attack along one direction: it has no budget, and
the L-inf size of its result is the smallest eps on the grid that fools the
model (the evaluation's ``distance`` column).

Choices: the gradient and the "misclassified" test use the EOT means over
``eot_samples`` stochastic passes; where no eps up to ``max_eps`` fools the
model the clean input is returned (the attack failed).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS
from robust.attacks.base import GradientAttack


class GrowingFGSM(GradientAttack):
    """The smallest eps on a grid at which the FGSM step fools the model (L-inf, unbounded).

    Args:
        steps: grid size (1000, Foolbox's default); max_eps: the largest eps tried (1.0);
        seed: accepted for a uniform attack signature; eot_samples, eot_chunk: see GradientAttack.
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
        x_adv = x.clone()
        todo = ~self._fooled(model, x, y)  # already misclassified: eps 0
        for k in range(1, self.steps + 1):
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            eps = self.max_eps * k / self.steps
            candidate = torch.clamp(x[idx] + eps * direction[idx], 0.0, 1.0)
            fooled = self._fooled(model, candidate, y[idx])
            x_adv[idx[fooled]] = candidate[fooled]
            todo[idx[fooled]] = False
        return x_adv

    @torch.no_grad()
    def _fooled(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = sum(model(x).float() for _ in range(self.eot_samples)) / self.eot_samples
        return logits.argmax(1) != y


@ATTACKS.register("fgsm-grow")
def _fgsm_grow(**kwargs) -> GrowingFGSM:
    return GrowingFGSM(**kwargs)
