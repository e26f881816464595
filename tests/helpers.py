"""Small builders the defense tests share: a seeded small CNN and a one-epoch training config."""
from __future__ import annotations

import torch
from torch import nn

from robust.models import create_model
from robust.train import TrainConfig


def small_model(splits, seed: int = 0):
    """small-cnn for ``splits``, initialised from ``seed``."""
    torch.manual_seed(seed)
    return create_model("small-cnn", num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size, mean=splits.mean, std=splits.std)


def quick_config(**overrides) -> TrainConfig:
    """One epoch of Adam at 2e-3, constant schedule, a short validation PGD."""
    base = dict(epochs=1, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0,
                schedule="constant", val_attack_steps=3)
    return TrainConfig(**{**base, **overrides})


class Quantized(nn.Module):
    """Gradient masking: inputs rounded to steps of 1/levels, so every input gradient is exactly zero."""

    def __init__(self, model: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x):
        return self.model(torch.round(x * self.levels) / self.levels)


def fgsm_band_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """The smallest eps on a grid at which FGSM accuracy on (x, y) lies in [20%, 80%]: the
    regime where stronger attacks can be told apart (None when no grid value gets there)."""
    from robust.attacks import create_attack

    for eps in (0.05, 0.075, 0.1, 0.15, 0.2, 0.3):
        x_adv = create_attack("fgsm", eps=eps)(model, x, y)
        with torch.no_grad():
            acc = (model(x_adv).argmax(1) == y).float().mean().item()
        if 0.2 <= acc <= 0.8:
            return eps
    return None


class NoisyInput(nn.Module):
    """A randomized defense in miniature: independent Gaussian noise on every input of every pass."""

    def __init__(self, model: nn.Module, sigma: float) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model(x + self.sigma * torch.randn_like(x))


def completed_trial(tmp_path, spec, state_dict, trial: str = "t0"):
    """An experiment 'exp' under ``tmp_path`` with one completed trial of ``spec`` whose checkpoint
    holds ``state_dict``: (storage, root, ModelSource)."""
    from cluster.evaluation import ModelSource
    from cluster.records import STATE_FILE, write_trial_row
    from cluster.storage import Storage

    storage = Storage(str(tmp_path))
    root = storage.experiment("exp")
    ckpt = tmp_path / "exp" / "tune" / "ckpt"
    ckpt.mkdir(parents=True)
    torch.save({"model": state_dict}, ckpt / STATE_FILE)
    write_trial_row(storage, root, trial, spec, "completed", checkpoint=str(ckpt))
    return storage, root, ModelSource(trial, spec.to_dict(), checkpoint=str(ckpt))
