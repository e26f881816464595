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
