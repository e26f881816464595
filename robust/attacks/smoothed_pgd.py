"""PGD against a classifier under additive noise, with EOT over the noise (STN section 6.2).

To avoid gradient masking by the randomness, STN (Li et al. 2019, section 6.2)
estimates the gradient as the mean over n0 noise draws r_i ~ N(0, sigma^2 I)
of grad L(x + r_i, y), the attacker knowing sigma.  That is PGD with EOT on the
noise-augmented model x -> f(x + r): this module wraps the model and reuses
:class:`robust.attacks.pgd.PGD` (its EOT stacks the n0 draws per forward pass).
"""
from __future__ import annotations

from torch import Tensor, nn

from robust.attacks import ATTACKS
from robust.attacks.pgd import PGD

NOISES = ("gaussian", "laplace")


class AdditiveNoise(nn.Module):
    """x -> model(x + noise): Gaussian N(0, sigma^2 I) or Laplace with scale sigma, drawn per pass."""

    def __init__(self, model: nn.Module, sigma: float, noise: str = "gaussian") -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if noise not in NOISES:
            raise ValueError(f"unknown noise {noise!r}; valid choices: {', '.join(NOISES)}")
        self.model, self.sigma, self.noise = model, float(sigma), noise

    def forward(self, x: Tensor) -> Tensor:
        if self.noise == "gaussian":
            r = x.new_empty(x.shape).normal_() * self.sigma
        else:  # Laplace(0, sigma) = sigma * (E1 - E2)
            r = (x.new_empty(x.shape).exponential_() - x.new_empty(x.shape).exponential_()) * self.sigma
        return self.model(x + r)


class SmoothedPGD(PGD):
    """EOT-PGD on f(x + r), r the certification noise (STN section 6.2).

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

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return super().perturb(AdditiveNoise(model, self.sigma, self.noise), x, y)


@ATTACKS.register("smoothed-pgd")
def _smoothed_pgd(eps: float, **kwargs) -> SmoothedPGD:
    return SmoothedPGD(eps=eps, **kwargs)
