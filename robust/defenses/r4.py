"""`r4`: training for the on-manifold average-case score R4 (Tibo, Jaeger & Larsen, sections 3.2 and 7).

The robust loss of eq. (7) with the R4 term of eq. (9): the indicator
I[f(x) = f(x')] of eq. (8) is replaced by the cross-entropy
CE(f^(x), f^(x')) between the network outputs (section 3), over samples x'
of S_eps(x) from a frozen autoencoder (eq. 13, :mod:`robust.scores.autoencoder`)
and a fresh uniform eps sample Sigma at every step:

    L(f) = CE(f(x), y)  +  lambda * mean_x sum_{eps in Sigma} w_eps(x) (1/N_eps) sum_{x' in S_eps(x)} CE(f^(x), f^(x'))

with the normalised 1/eps weights w_eps(x) of :mod:`robust.scores.r4`.

Choices the paper leaves open, and ours:

* The sign.  R4 is an agreement to be maximised, while CE is a
  disagreement; substituting CE for the indicator and *subtracting* lambda
  times it, as eq. (7) literally reads, would reward label changes.  We add
  lambda times the CE term, i.e. subtract lambda times the soft agreement -CE.
* The autoencoder is trained first and frozen (section 7): in
  ``train_dataset``, on the training split, seeded by the trial seed, on the
  default device; its weights are kept in the defense's ``state_dict`` (saved
  in every checkpoint), so a resumed trial does not retrain it and evaluation,
  which rebuilds the classifier alone, never needs it.
* |Sigma| = ``eps_samples`` = 10 and s = ``sigma`` = 0.06 (section 7); eps
  uniform on (0, eps_max], eps_max = d = sqrt(m) unless given.  The number of
  autoencoder samples per example is not given: ``samples`` = 10.
* f^(x) is detached in the CE (the term pulls f(x') towards f(x)); examples
  with no sample inside any eps of Sigma contribute 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from robust.data.base import ImageSplit
from robust.defenses import DEFENSES
from robust.defenses.base import BatchLoss, Defense, TrainStep
from robust.defenses.r2 import soft_disagreement
from robust.device import default_device
from robust.scores.autoencoder import Autoencoder, AutoencoderConfig, build_autoencoder, manifold_samples, \
    train_autoencoder
from robust.scores.r4 import R4Config, eps_sample, eps_weights
from robust.seeding import derive_seed


@dataclass
class R4TrainConfig:
    """lam: lambda (>= 0); sigma: code noise s (0.06); samples: autoencoder samples per example (10);
    eps_samples: |Sigma| per step (10); eps_max: None for the diameter sqrt(m);
    ae_epochs, ae_latent: the autoencoder's training epochs and code size."""

    lam: float = 1.0
    sigma: float = 0.06
    samples: int = 10
    eps_samples: int = 10
    eps_max: Optional[float] = None
    ae_epochs: int = 20
    ae_latent: int = 8

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ValueError(f"r4 lam (lambda) must be >= 0, got {self.lam}")
        # the sampler's settings are those of the score: validated by its config
        R4Config(sigma=self.sigma, samples=self.samples, eps_samples=self.eps_samples, eps_max=self.eps_max)
        AutoencoderConfig(epochs=self.ae_epochs, latent=self.ae_latent)


@DEFENSES.register("r4")
class R4Training(Defense):
    """CE plus lambda times the soft R4 disagreement over frozen-autoencoder samples."""

    name = "r4"

    def __init__(self, eps_data: float = 8 / 255, **config) -> None:
        # eps_data is accepted for the registry contract: R4's eps are sampled up to eps_max.
        super().__init__(R4TrainConfig(**config))
        self.autoencoder: Optional[Autoencoder] = None
        self._saved: Dict[str, Any] = {}

    def ae_config(self, seed: int) -> AutoencoderConfig:
        return AutoencoderConfig(epochs=self.config.ae_epochs, latent=self.config.ae_latent,
                                 seed=derive_seed(seed, 0xAE))

    def train_dataset(self, split: ImageSplit, seed: int):
        if self.autoencoder is None:
            cfg = self.ae_config(seed)
            if self._saved:
                self.autoencoder = build_autoencoder(tuple(split[0][0].shape), cfg)
                self.autoencoder.load_state_dict(self._saved)
                self.autoencoder.eval().requires_grad_(False)
            else:
                self.autoencoder = train_autoencoder(split, cfg, default_device())
        return split

    def state_dict(self) -> Dict[str, Any]:
        return {"autoencoder": self.autoencoder.state_dict()} if self.autoencoder is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._saved = dict(state.get("autoencoder", {})) if state else {}
        self.autoencoder = None

    def loss(self, step: TrainStep) -> BatchLoss:
        cfg = self.config
        logits = step.model(step.x)
        loss = F.cross_entropy(logits, step.y)
        if cfg.lam > 0:
            if self.autoencoder is None:
                raise RuntimeError("r4: train_dataset must run before the first loss (it trains the autoencoder)")
            ae = self.autoencoder.to(step.x.device)
            n, m = step.x.shape[0], cfg.samples
            noise = torch.randn((n, m, ae.encoder[-1].out_features), generator=step.generator,
                                device=step.x.device)
            xs = manifold_samples(ae, step.x, noise, cfg.sigma)
            distances = (xs - step.x[:, None]).flatten(2).norm(dim=2)
            eps_max = cfg.eps_max if cfg.eps_max is not None else math.sqrt(step.x[0].numel())
            eps = eps_sample(cfg.eps_samples, eps_max, step.generator)
            inside, w = eps_weights(distances, eps)
            ce = soft_disagreement(logits[:, None, :].expand(n, m, -1),
                                   step.model(xs.flatten(0, 1)).view(n, m, -1))           # (N, M)
            inside_f = inside.to(ce.dtype)
            per_eps = (inside_f * ce[:, None, :]).sum(-1) / inside_f.sum(-1).clamp_min(1)  # (N, E)
            term = (torch.nan_to_num(w, nan=0.0).to(ce.dtype) * per_eps).sum(1)
            loss = loss + cfg.lam * term.mean()
        return BatchLoss(loss, logits)
