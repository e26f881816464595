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
        x = fast_layout(x.detach()).requires_grad_(True)  # the gradient comes back in this layout
        n = x.shape[0]
        if self.eot_samples == 1:  # the plain gradient, without the accumulation
            losses = loss_fn(model(x), y).float()
            return torch.autograd.grad(losses.sum(), x)[0], losses.detach()
        copies_per_pass = self._copies_per_pass(n, x.device, model)
        grad = torch.zeros_like(x)
        loss_sum = torch.zeros(n, device=x.device, dtype=torch.float32)
        remaining = self.eot_samples
        while remaining > 0:
            copies = min(copies_per_pass, remaining)
            xs = torch.cat([x] * copies) if copies > 1 else x  # keeps x's (fast) layout: one copy
            ys = y.repeat(copies) if copies > 1 else y
            losses = loss_fn(model(xs), ys).float()
            grad += torch.autograd.grad(losses.sum(), x)[0]
            loss_sum += losses.detach().view(copies, n).sum(0)
            remaining -= copies
        return grad / self.eot_samples, loss_sum / self.eot_samples

    def _copies_per_pass(self, batch: int, device: torch.device, model: Optional[nn.Module] = None) -> int:
        # A model that draws its noise once per forward call (stochastic weights sampled
        # per batch) would give every stacked copy the same draw: one copy per pass then.
        if getattr(model, "noise_shared_in_batch", False):
            return 1
        chunk = self.eot_chunk if self.eot_chunk is not None else default_eot_chunk(device)
        return max(1, min(self.eot_samples, chunk // max(batch, 1)))
