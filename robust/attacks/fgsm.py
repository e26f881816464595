"""FGSM (Goodfellow, Shlens & Szegedy 2015): one signed-gradient step of size eps."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from robust.attacks import ATTACKS
from robust.attacks.base import GradientAttack, threat_model


class FGSM(GradientAttack):
    """x_adv = clip(x + eps * sign(grad_x loss(f(x), y)), 0, 1), L-inf threat model.

    Args:
        eps: L-inf budget (e.g. 8/255 on CIFAR-10, as in the constant-perturbation paper, Table 1).
        eot_samples, eot_chunk: see GradientAttack.
    Shapes: x (N,C,H,W) in [0,1], y (N,) -> x_adv like x.
    Example: ``FGSM(eps=8/255)(model, x, y)``.
    """

    name = "fgsm"

    def __init__(self, eps: float, eot_samples: int = 1, eot_chunk: Optional[int] = None,
                 seed: int = 0) -> None:
        # ``seed`` is accepted for a uniform attack signature; FGSM draws nothing.
        super().__init__(eot_samples=eot_samples, eot_chunk=eot_chunk)
        self.ball = threat_model("linf", eps)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        grad = self.input_gradient(model, x, y)
        return self.ball.project(self.ball.step(x, grad, self.ball.eps), x)


@ATTACKS.register("fgsm")
def _fgsm(eps: float, **kwargs) -> FGSM:
    return FGSM(eps=eps, **kwargs)
