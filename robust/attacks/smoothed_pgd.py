"""Additive input noise, the noisy classifier it makes, and PGD against it (STN section 6.2).

:func:`sample_noise` and :class:`AdditiveNoise` are the project's one implementation
of additive input noise: STN's training loss, the deployed classifier of an
additive-noise defense (:meth:`robust.defenses.base.Defense.deployed`), this
attack and the certification sampler (:class:`robust.certify.Smooth`) all draw
their noise here.

To avoid gradient masking by the randomness, STN (Li et al. 2019, section 6.2)
estimates the gradient as the mean over n0 noise draws r_i ~ N(0, sigma^2 I)
of grad L(x + r_i, y), the attacker knowing sigma.  That is PGD with EOT on the
noise-augmented model x -> f(x + r): :class:`SmoothedPGD` wraps the model and
reuses :class:`robust.attacks.pgd.PGD` (its EOT stacks the n0 draws per pass).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.attacks import ATTACKS
from robust.attacks.pgd import PGD

NOISES = ("gaussian", "laplace")


def sample_noise(x: Tensor, noise: str, sigma: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """i.i.d. noise shaped like ``x``: N(0, sigma^2) or Laplace(0, sigma) per coordinate.

    Laplace(0, lambda) is drawn as lambda * (E1 - E2) with E1, E2 ~ Exp(1)
    independent (the difference of two unit exponentials is a unit Laplace),
    since torch has no Laplace sampler that takes a generator.  ``generator``
    (on ``x.device``) seeds the draw; None draws from torch's global RNG, which
    the evaluation protocol seeds per batch.
    """
    if noise == "gaussian":
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * sigma
    if noise == "laplace":
        e = torch.empty((2, *x.shape), device=x.device, dtype=x.dtype).exponential_(1.0, generator=generator)
        return (e[0] - e[1]) * sigma
    raise ValueError(f"unknown noise {noise!r}; valid choices: {', '.join(NOISES)}")


class AdditiveNoise(nn.Module):
    """STN's Algorithm 1 classifier around ``model``: the class voted by ``copies`` noisy copies.

    Each forward pass draws fresh noise r_i (Gaussian N(0, sigma^2 I), or
    Laplace with scale sigma) from torch's global RNG.

    * ``copies = 1`` (Algorithm 1: "n = 1 is sufficient if only the robust
      classification c is desired"): exactly x -> model(x + r).
    * ``copies = n > 1``: the n copies x + r_i go through ``model`` in one
      batch.  The forward value is log((v + 1) / (n + K)), v the per-class
      counts of the n hard votes (K classes), so its argmax is the majority
      class of Algorithm 1 (ties to the lower class index, as torch.argmax and
      torch.mode break them), and it is neither probabilities nor constant.
      Hard votes have no gradient, so the backward pass is the straight-through
      gradient of log(mean_i softmax(model(x + r_i))), the smoothed soft
      classifier that SmoothAdv attacks (Salman et al. 2019): averaged over the
      n copies, and over EOT draws on top, it is the gradient STN section 6.2
      asks for.  A verdict on this model judges the majority of n votes; an
      attack's loss sees the vote counts and the soft classifier's slope.

    Args: model: the base classifier (images in [0, 1] -> logits); sigma > 0:
    the noise scale; noise: 'gaussian' or 'laplace'; copies: n >= 1.
    Shapes: x (N, C, H, W) -> (N, K).
    """

    def __init__(self, model: nn.Module, sigma: float, noise: str = "gaussian", copies: int = 1) -> None:
        super().__init__()
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if noise not in NOISES:
            raise ValueError(f"unknown noise {noise!r}; valid choices: {', '.join(NOISES)}")
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies (noisy copies per prediction) must be an integer >= 1, got {copies!r}")
        self.model, self.sigma, self.noise, self.copies = model, float(sigma), noise, copies

    @property
    def classifier_name(self) -> str:
        """What results rows call this classifier, e.g. 'noisy(n=1,sigma=0.25,gaussian)'."""
        return f"noisy(n={self.copies},sigma={self.sigma:g},{self.noise})"

    def forward(self, x: Tensor) -> Tensor:
        if self.copies == 1:
            return self.model(x + sample_noise(x, self.noise, self.sigma))
        n, batch = self.copies, x.shape[0]
        xs = x.unsqueeze(0).expand(n, *x.shape).reshape(n * batch, *x.shape[1:])
        logits = self.model(xs + sample_noise(xs, self.noise, self.sigma)).float().view(n, batch, -1)
        classes = logits.shape[-1]
        soft = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(n)
        votes = F.one_hot(logits.argmax(-1), classes).sum(0).to(soft.dtype)
        hard = torch.log((votes + 1.0) / (n + classes))
        return soft + (hard - soft).detach()


def additive_noise_of(model: nn.Module) -> Optional[AdditiveNoise]:
    """The :class:`AdditiveNoise` inside ``model`` (or ``model`` itself), None if there is none."""
    return next((m for m in model.modules() if isinstance(m, AdditiveNoise)), None)


class SmoothedPGD(PGD):
    """EOT-PGD on f(x + r), r the certification noise (STN section 6.2).

    On a model that already adds input noise (the deployed classifier of an
    additive-noise defense, :meth:`robust.defenses.base.Defense.deployed`) the
    attack adds none: it attacks that classifier as it is, EOT over its own
    noise, which must be the noise the attack was told (same type, sigma equal
    to 1e-3 relative); otherwise ValueError, since noise added twice would
    attack a classifier nobody deploys.  On a noise-free model it attacks
    x -> model(x + r).

    Args:
        eps, norm, step_size, steps, random_start, restarts, seed, eot_chunk: as PGD.
        sigma: noise scale the attacker knows (the defense's sigma); noise: its type.
        eot_samples: n0, the noise draws averaged per gradient (default 100, the
            n0 of our certification presets; the paper does not state its n0 here).
    Example: ``SmoothedPGD(eps=0.5, norm="l2", sigma=0.25)(model, x, y)``.
    """

    name = "smoothed-pgd"

    def __init__(self, eps: float, sigma: float, noise: str = "gaussian", eot_samples: int = 100,
                 **kwargs) -> None:
        super().__init__(eps=eps, eot_samples=eot_samples, **kwargs)
        self.sigma, self.noise = sigma, noise
        AdditiveNoise(nn.Identity(), sigma, noise)  # validate sigma and noise now

    def target(self, model: nn.Module) -> nn.Module:
        """The classifier this attack runs on: ``model`` under the attack's noise, or ``model``
        itself when it already adds that noise; ValueError when it adds other noise."""
        inner = additive_noise_of(model)
        if inner is None:
            return AdditiveNoise(model, self.sigma, self.noise)
        if inner.noise != self.noise or not math.isclose(inner.sigma, self.sigma, rel_tol=1e-3):
            raise ValueError(
                f"smoothed-pgd: the model already adds {inner.noise} noise of sigma {inner.sigma:g} (the "
                f"deployed classifier {inner.classifier_name}); the attack's {self.noise} noise of sigma "
                f"{self.sigma:g} would be added on top: give sigma={inner.sigma:g} or evaluate --classifier base")
        return model

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return super().perturb(self.target(model), x, y)


@ATTACKS.register("smoothed-pgd")
def _smoothed_pgd(eps: float, **kwargs) -> SmoothedPGD:
    return SmoothedPGD(eps=eps, **kwargs)
