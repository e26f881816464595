"""The manifold sampler of R4 (Tibo et al., section 4.2, eq. 13; section 7).

S(x) = { dec(enc(x) + N(0, s^2 I)) }: noise added to the code of x and mapped
back to the input space, so that the samples follow the data distribution
locally around x.  The paper's g is a Wasserstein autoencoder (Tolstikhin et
al. 2018); ours is a small WAE-MMD with MLP encoder and decoder: the
reconstruction error sum_j (x_j - dec(enc(x))_j)^2 plus ``mmd_weight`` times the
MMD (inverse multiquadratic kernel, C = 2 * latent) between the codes of a
batch and draws from the prior N(0, I).  The prior fixes the scale of the code,
which is what makes a noise level such as s = 0.06 (section 7) meaningful.
The paper gives its architecture only in an appendix we do not have: the
sizes (latent 8, hidden 256) are ours.  The decoder ends in a sigmoid, so
samples lie in [0, 1].  Training is seeded and does not touch torch's global RNG.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from robust.data.base import ImageSplit


@dataclass(frozen=True)
class AutoencoderConfig:
    """latent: code size; hidden: MLP width; epochs, batch_size, lr: Adam training on the
    training split; mmd_weight: lambda of WAE-MMD (10, Tolstikhin et al.'s MNIST value); seed."""

    latent: int = 8
    hidden: int = 256
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    mmd_weight: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("latent", "hidden", "epochs", "batch_size"):
            if int(getattr(self, key)) != getattr(self, key) or getattr(self, key) < 1:
                raise ValueError(f"autoencoder {key} must be an integer >= 1, got {getattr(self, key)}")
        if not (self.lr > 0 and self.mmd_weight >= 0):
            raise ValueError(f"autoencoder lr must be > 0 and mmd_weight >= 0, got {self.lr}, {self.mmd_weight}")

    def to_dict(self) -> dict:
        return asdict(self)


class Autoencoder(nn.Module):
    """enc: (N, C, H, W) in [0,1] -> (N, latent); dec: (N, latent) -> (N, C, H, W) in [0,1]."""

    def __init__(self, shape: tuple, latent: int = 8, hidden: int = 256) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        m = self.shape[0] * self.shape[1] * self.shape[2]
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(m, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                     nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, m), nn.Sigmoid())

    def enc(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def dec(self, z: Tensor) -> Tensor:
        return self.decoder(z).view(z.shape[0], *self.shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(self.enc(x))


def build_autoencoder(shape: tuple, config: AutoencoderConfig) -> Autoencoder:
    """The untrained autoencoder, initialised from ``config.seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return Autoencoder(shape, config.latent, config.hidden)


def mmd_imq(z: Tensor, prior: Tensor) -> Tensor:
    """Unbiased MMD^2 between two samples (n, d) with the kernel C / (C + ||a - b||^2), C = 2d."""
    c = 2.0 * z.shape[1]
    n = z.shape[0]

    def k(a: Tensor, b: Tensor) -> Tensor:
        return c / (c + torch.cdist(a, b).pow(2))

    off = 1.0 - torch.eye(n, device=z.device, dtype=z.dtype)
    within = ((k(z, z) + k(prior, prior)) * off).sum() / max(n * (n - 1), 1)
    return within - 2.0 * k(z, prior).mean()


def train_autoencoder(split: ImageSplit, config: AutoencoderConfig = AutoencoderConfig(),
                      device: Optional[torch.device] = None) -> Autoencoder:
    """Train on ``split`` (the training split) and return the frozen autoencoder in eval mode."""
    device = device or torch.device("cpu")
    x0 = split[0][0]
    ae = build_autoencoder(tuple(x0.shape), config).to(device)
    optimizer = torch.optim.Adam(ae.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    ae.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(split), generator=gen)
        for start in range(0, len(order), config.batch_size):
            x = split.batch(order[start:start + config.batch_size])[0].to(device)
            z = ae.enc(x)
            recon = (ae.dec(z) - x).flatten(1).pow(2).sum(1).mean()
            prior = torch.randn(z.shape, generator=gen).to(device)
            loss = recon + config.mmd_weight * mmd_imq(z, prior) if z.shape[0] > 1 else recon
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae


@torch.no_grad()
def manifold_samples(ae: Autoencoder, x: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """dec(enc(x) + sigma * noise) (eq. 13): x (N, C, H, W), noise (N, M, latent) standard
    normal -> samples (N, M, C, H, W) in [0, 1]."""
    z = ae.enc(x)
    codes = z[:, None, :] + sigma * noise.to(z.device, z.dtype)
    return ae.dec(codes.flatten(0, 1)).view(x.shape[0], noise.shape[1], *x.shape[1:])
