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

from robust.attacks import verdict
from robust.device import fast_layout

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy (N,): summed for the gradient, so per-example
    gradients do not shrink with the batch size."""
    return F.cross_entropy(logits, y, reduction="none")


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


def _per_example_norm(t: Tensor) -> Tensor:
    """L2 norm of each example, shaped (N, 1, 1, ...) for broadcasting."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class L2Ball:
    """The L2 threat model {x' : ||x' - x||_2 <= eps, x' in [0,1]^d}."""

    eps: float

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        delta = x_adv - x
        delta = delta * torch.clamp(self.eps / _per_example_norm(delta), max=1.0)
        return torch.clamp(x + delta, 0.0, 1.0)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        """Steepest ascent under L2: a step of length ``step_size`` along grad / ||grad||."""
        return x_adv + step_size * grad / _per_example_norm(grad)

    def random_start(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """A point uniform in the L2 ball: direction uniform on the sphere, radius eps * U^(1/d)."""
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _per_example_norm(direction)
        d = x[0].numel()
        radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator,
                            device=x.device, dtype=x.dtype) ** (1.0 / d)
        return self.project(x + self.eps * radius * direction, x)


THREAT_MODELS = {"linf": LinfBall, "l2": L2Ball}


def threat_model(norm: str, eps: float):
    """The ball of ``norm`` ('linf' or 'l2') and radius ``eps``."""
    if norm not in THREAT_MODELS:
        raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(THREAT_MODELS)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return THREAT_MODELS[norm](float(eps))


#: Inputs per forward pass when the EOT copies of a batch are stacked, by device.
#: Measured on a 2-core CPU (small conv net): 20 passes of 32 images took 0.16 s
#: and one pass of 640 images 0.42 s, while for one image one pass of 20 copies
#: beat 20 passes by 2x: so on CPU stack copies only up to a few dozen inputs.
#: On a GPU large batches win.
DEFAULT_EOT_CHUNK = {"cpu": 64, "cuda": 4096}


def default_eot_chunk(device: torch.device) -> int:
    return DEFAULT_EOT_CHUNK.get(device.type, DEFAULT_EOT_CHUNK["cpu"])


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
            of a batch are stacked (always at least one copy of the batch per
            pass); None chooses per device (:data:`DEFAULT_EOT_CHUNK`).
    """

    def __init__(self, eot_samples: int = 1, eot_chunk: Optional[int] = None,
                 loss_fn: LossFn = cross_entropy) -> None:
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
        grad, _ = self.loss_and_gradient(model, x, y, self.loss_fn)
        return grad

    def loss_and_gradient(self, model: nn.Module, x: Tensor, y: Tensor,
                          loss_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """EOT estimate of the per-example loss and its input gradient.

        ``loss_fn(logits, y)`` returns per-example losses (N,).  Returns
        (gradient like x, mean per-example loss over the S passes (N,)).
        Parameter gradients are never touched (``torch.autograd.grad``).
        """
        grad, loss, _, _ = self.loss_gradient_score(model, x, y, loss_fn)
        return grad, loss

    def loss_gradient_score(self, model: nn.Module, x: Tensor, y: Tensor,
                            loss_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """As :meth:`loss_and_gradient`, plus the verdict's score on the same S draws: the
        fraction of the passes whose top-1 class is y (N,), and the S passes' mean logits.

        The S copies of the batch are stacked along the batch dimension in chunks of at
        most ``eot_chunk`` rows, but only where the model gives stacked copies distinct
        draws (:func:`robust.attacks.verdict.copies_per_pass`): otherwise one copy per pass.
        """
        x = fast_layout(x.detach()).requires_grad_(True)  # the gradient comes back in this layout
        n = x.shape[0]
        if self.eot_samples == 1:  # the plain gradient, without the accumulation
            logits = model(x)
            losses = loss_fn(logits, y).float()
            grad = torch.autograd.grad(losses.sum(), x)[0]
            logits = logits.detach().float()
            return grad, losses.detach(), (logits.argmax(1) == y).float(), logits
        copies_per_pass = self.copies_per_pass(model, x)
        grad = torch.zeros_like(x)
        loss_sum = torch.zeros(n, device=x.device, dtype=torch.float32)
        hits = torch.zeros(n, device=x.device, dtype=torch.float32)
        logit_sum = None
        remaining = self.eot_samples
        while remaining > 0:
            copies = min(copies_per_pass, remaining)
            xs = torch.cat([x] * copies) if copies > 1 else x  # keeps x's (fast) layout: one copy
            ys = y.repeat(copies) if copies > 1 else y
            logits = model(xs)
            losses = loss_fn(logits, ys).float()
            grad += torch.autograd.grad(losses.sum(), x)[0]
            loss_sum += losses.detach().view(copies, n).sum(0)
            per_copy = logits.detach().float().view(copies, n, -1)
            hits += (per_copy.argmax(-1) == y[None]).float().sum(0)
            logit_sum = per_copy.sum(0) if logit_sum is None else logit_sum + per_copy.sum(0)
            remaining -= copies
        s = self.eot_samples
        return grad / s, loss_sum / s, hits / s, logit_sum / s

    def copies_per_pass(self, model: nn.Module, x: Tensor) -> int:
        """Copies of the batch ``x`` one EOT forward pass stacks: within ``eot_chunk`` inputs,
        and 1 where the model would give stacked copies one shared draw."""
        return verdict.copies_per_pass(model, x, self.eot_samples, self.chunk(x.device))

    def chunk(self, device: torch.device) -> int:
        """At most this many inputs per forward pass: ``eot_chunk``, or the device's default."""
        return self.eot_chunk if self.eot_chunk is not None else default_eot_chunk(device)

    def is_stochastic(self, model: nn.Module, x: Tensor) -> bool:
        """Whether the attacked model's forward passes differ (asked once per attack call;
        the answer decides which rules of :mod:`robust.attacks.verdict` apply)."""
        return verdict.is_stochastic(model, x)
