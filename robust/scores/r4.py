"""R4, the on-manifold average-case score (Tibo et al., Example 4, eqs. 8 and 9, section 7).

Example 4 takes Q = P (samples on the data manifold), H(p) = p and
G(x, eps) = p(x) / eps.  With x drawn from the data (the p(x) factor) and eps
from a uniform sample Sigma of (0, eps_max] (eq. 9),

    R_S(x, eps) = (1/N_eps) sum_{x' in S_eps(x)} I[f(x') = f(x)]            (8)
    R4(x)       = sum_{eps in Sigma} w_eps(x) R_S(x, eps),
    w_eps(x)    = (1/eps) / sum_{eps' in Sigma(x)} (1/eps')

where S_eps(x) are the autoencoder samples dec(enc(x) + N(0, s^2)) at L2
distance < eps from x (the open ball), and Sigma(x) the eps values of Sigma
whose S_eps(x) is not empty.  R4 is the mean of R4(x) over the test examples.

Choices (the issue's and ours, where the paper leaves it open):

* Normalised 1/eps weights.  With G = p(x)/eps as printed, the integral over
  eps diverges at 0; normalising the weights over the eps sample makes the
  score a weighted average of probabilities, so a classifier whose label never
  changes scores exactly 1 (and one whose label always changes, 0).
* An eps whose S_eps(x) is empty carries no evidence (R_S is 0/0) and is left
  out of that example's normalisation; an example with no sample inside any
  eps of Sigma gets NaN (``eps_used = 0``) and is left out of the mean.
* eps_max defaults to d = sqrt(m), the diameter of [0,1]^m (eq. 3 integrates
  eps over [0, d]).  |Sigma| = 200 for scoring (section 7).  The number of
  samples per example is not given: 100 for scoring (``samples``).
* Sigma and each example's code noise are seeded by (seed, example index), so
  every model of an experiment is scored on the same Sigma and S_eps(x), as
  section 7 does ("the same generated Sigma and S_eps(x) ... for both approaches").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from robust.scores.autoencoder import Autoencoder, manifold_samples
from robust.seeding import derive_seed

_EPS_STREAM, _NOISE_STREAM = 1, 2
#: Samples per forward pass when a batch's N x M samples are classified.
FORWARD_CHUNK = 1024


@dataclass(frozen=True)
class R4Config:
    """sigma: code noise s (0.06, section 7); samples: autoencoder samples per example (100);
    eps_samples: |Sigma| (200 for scoring, section 7); eps_max: upper end of the uniform eps
    sample (None: the diameter d = sqrt(m)); seed: seeds Sigma and the code noise."""

    sigma: float = 0.06
    samples: int = 100
    eps_samples: int = 200
    eps_max: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"r4 sigma must be > 0, got {self.sigma}")
        if self.samples < 1:
            raise ValueError(f"r4 samples must be >= 1, got {self.samples}")
        if self.eps_samples < 1:
            raise ValueError(f"r4 eps_samples (|Sigma|) must be >= 1, got {self.eps_samples}: the eps sample is empty")
        if self.eps_max is not None and not (math.isfinite(self.eps_max) and self.eps_max > 0):
            raise ValueError(f"r4 eps_max must be > 0 (or None for the diameter), got {self.eps_max}")


def eps_sample(count: int, eps_max: float, generator: torch.Generator) -> Tensor:
    """Sigma: ``count`` values uniform on (0, eps_max] (never 0: the weight is 1/eps)."""
    if count < 1:
        raise ValueError(f"the eps sample needs at least one value, got {count}")
    if not eps_max > 0:
        raise ValueError(f"eps_max must be > 0, got {eps_max}")
    u = torch.rand(count, generator=generator, device=generator.device, dtype=torch.float64)
    return eps_max * (1.0 - u)


def check_eps_values(eps: Tensor) -> None:
    if eps.numel() == 0:
        raise ValueError("eps sample is empty; give at least one eps > 0")
    if not bool((eps > 0).all()) or not bool(torch.isfinite(eps).all()):
        raise ValueError("eps values must be finite and > 0 (the R4 weight is 1/eps)")


def eps_weights(distances: Tensor, eps: Tensor) -> tuple:
    """(inside (N, E, M) bool: sample m within eps e of x; weights (N, E): normalised 1/eps
    over the eps values with a non-empty S_eps(x), 0 elsewhere; NaN rows where all are empty)."""
    inside, raw = _inside_and_raw_weights(distances, eps)
    return inside, raw / raw.sum(1, keepdim=True)


def _inside_and_raw_weights(distances: Tensor, eps: Tensor) -> tuple:
    check_eps_values(eps)
    eps = eps.to(distances.device, torch.float64)
    inside = distances.double()[:, None, :] < eps[None, :, None]
    return inside, inside.any(-1).double() / eps[None, :]


def r4_from_agreement(agree: Tensor, distances: Tensor, eps: Tensor) -> Tensor:
    """Per-example R4 (N,) from agreement I[f(x') = f(x)] (N, M) (or any value in [0, 1])
    and sample distances ||x' - x||_2 (N, M), for the eps sample ``eps`` (E,)."""
    inside, raw = _inside_and_raw_weights(distances, eps)
    count = inside.sum(-1).double()
    r_s = (inside.double() * agree.double()[:, None, :]).sum(-1) / count.clamp_min(1)  # eq. (8)
    # normalised last, so that R_S = 1 everywhere gives exactly 1 (sum w / sum w); NaN where
    # no eps has a sample (0 / 0)
    return (raw * r_s).sum(1) / raw.sum(1)


def example_noise(indices: Sequence[int], samples: int, latent: int, seed: int) -> Tensor:
    """Standard normal code noise (N, M, latent), seeded per (seed, example index)."""
    return torch.stack([torch.randn(samples, latent, generator=torch.Generator().manual_seed(
        derive_seed(seed, _NOISE_STREAM, int(i)))) for i in indices])


def scoring_eps(config: R4Config, dims: int) -> Tensor:
    """The scoring Sigma: the same for every example and model of a given seed."""
    eps_max = config.eps_max if config.eps_max is not None else math.sqrt(dims)
    return eps_sample(config.eps_samples, eps_max,
                      torch.Generator().manual_seed(derive_seed(config.seed, _EPS_STREAM)))


@torch.no_grad()
def r4_scores(model: nn.Module, ae: Autoencoder, x: Tensor, indices: Sequence[int],
              config: R4Config = R4Config()) -> Dict[str, Tensor]:
    """R4 per example of one batch: {"prediction", "score" (NaN: no sample in any ball),
    "eps_used" (eps values with a non-empty S_eps), "agreement" (fraction of all samples
    keeping the label), "distance" (mean sample distance)}.  Eval mode, restored."""
    was_training = model.training
    model.eval()
    try:
        noise = example_noise(indices, config.samples, ae.encoder[-1].out_features, config.seed)
        xs = manifold_samples(ae, x, noise, config.sigma)                    # (N, M, C, H, W)
        labels = model(x).argmax(1)
        flat = xs.flatten(0, 1)
        sample_labels = torch.cat([model(part).argmax(1) for part in flat.split(FORWARD_CHUNK)])
        sample_labels = sample_labels.view(x.shape[0], config.samples)
    finally:
        model.train(was_training)
    agree = sample_labels == labels[:, None]
    distances = (xs - x[:, None]).flatten(2).norm(dim=2)
    eps = scoring_eps(config, x[0].numel())
    inside, _ = eps_weights(distances, eps)
    return {"prediction": labels, "score": r4_from_agreement(agree, distances, eps),
            "eps_used": inside.any(-1).sum(1), "agreement": agree.double().mean(1),
            "distance": distances.double().mean(1)}
