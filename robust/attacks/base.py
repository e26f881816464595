"""What every attack shares: mode handling, input checks, threat models, EOT gradients.

An attack is built with its hyperparameters and called as ``attack(model, x, y)``;
it returns ``x_adv`` in [0, 1] inside its threat model.  Subclasses implement
``perturb`` only.  Gradient attacks obtain their input gradient from
:meth:`GradientAttack.input_gradient`, which implements Expectation over
Transformation (Athalye et al. 2018): the gradient of the loss averaged over
``eot_samples`` stochastic forward passes, evaluated in chunks of at most
``eot_chunk`` inputs per pass.  With ``eot_samples=1`` on a deterministic model it
is exactly the plain gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy_sum(logits: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy: per-example gradients do not shrink with the batch size."""
    return F.cross_entropy(logits, y, reduction="sum")


@dataclass(frozen=True)
class LinfBall:
    """The L-inf threat model {x' : ||x' - x||_inf <= eps, x' in [0,1]^d} (Madry et al. 2018)."""

    eps: float

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        delta = torch.clamp(x_adv - x, -self.eps, self.eps)
        return torch.clamp(x + delta, 0.0, 1.0)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        """Steepest ascent under L-inf: a step of ``step_size`` along sign(grad)."""
        return x_adv + step_size * grad.sign()

    def random_start(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.project(x + (2.0 * noise - 1.0) * self.eps, x)


class Attack:
    """Base class: saves and restores train/eval mode, checks the input range.

    Subclasses implement ``perturb(model, x, y) -> x_adv``.  The model is put in
    eval mode for the attack (noise modules of randomized defenses stay active:
    they sample in eval mode too) and restored afterwards.
    """

    name = "attack"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if x.min() < 0.0 or x.max() > 1.0:
            raise ValueError("attack inputs must lie in [0, 1] (normalisation belongs inside the model)")
        was_training = model.training
        model.eval()
        try:
            x_adv = self.perturb(model, x.detach(), y.detach())
        finally:
            model.train(was_training)
        return x_adv.detach()

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError


class GradientAttack(Attack):
    """An attack that follows input gradients, with EOT built in.

    Args:
        eot_samples: S, the number of stochastic forward passes whose loss
            gradients are averaged (1 = plain gradient).
        eot_chunk: at most this many inputs per forward pass when the S copies
            of a batch are stacked; None stacks all S copies in one pass.
    """

    def __init__(self, eot_samples: int = 1, eot_chunk: Optional[int] = None,
                 loss_fn: LossFn = cross_entropy_sum) -> None:
        if eot_samples < 1:
            raise ValueError(f"eot_samples must be >= 1, got {eot_samples}")
        if eot_chunk is not None and eot_chunk < 1:
            raise ValueError(f"eot_chunk must be >= 1 or None, got {eot_chunk}")
        self.eot_samples = eot_samples
        self.eot_chunk = eot_chunk
        self.loss_fn = loss_fn

    def input_gradient(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """d/dx of (1/S) sum_s loss(model_s(x), y), model_s being the s-th stochastic pass.

        The S copies of the batch are stacked along the batch dimension and run
        in chunks of at most ``eot_chunk`` rows, so the S passes share forward
        calls where memory allows.  Shape of the result: x.shape.
        """
        x = x.detach().requires_grad_(True)
        copies_per_pass = self._copies_per_pass(x.shape[0])
        total = torch.zeros((), device=x.device)
        remaining = self.eot_samples
        while remaining > 0:
            copies = min(copies_per_pass, remaining)
            xs = x.repeat(copies, *([1] * (x.dim() - 1))) if copies > 1 else x
            ys = y.repeat(copies) if copies > 1 else y
            loss = self.loss_fn(model(xs), ys) / self.eot_samples
            loss.backward()
            total = total + loss.detach()
            remaining -= copies
        return x.grad.detach()

    def _copies_per_pass(self, batch: int) -> int:
        if self.eot_chunk is None:
            return self.eot_samples
        return max(1, min(self.eot_samples, self.eot_chunk // max(batch, 1)))
