"""Tiny generated data for unit tests: fast, deterministic from a seed, easily learnable.

Each class c has a fixed prototype image P_c ~ U(0, 1) per pixel; an example of
class c is clip(P_c + noise * N(0, 1), 0, 1).  Labels are balanced.  With the
defaults (1 channel, 8x8, noise 0.1) prototypes lie about 3.3 apart in L2 and the
noise has norm about 0.8, so a linear model separates the classes.

mean/std are those of the uniform prototypes, 0.5 and sqrt(1/12) = 0.2887 per
channel (noise and clipping shift them slightly; the values only need to be
fixed).  eps_data = 0.1 like digits.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from robust.data.base import DatasetSpec, DatasetSplits, SourceData, register_dataset

SYNTHETIC_STD = math.sqrt(1.0 / 12.0)


def generate_synthetic(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 8,
    n_train: int = 600,
    n_test: int = 200,
    noise: float = 0.1,
    seed: int = 0,
) -> SourceData:
    """Draw prototypes, then the training and test examples, from one torch.Generator(seed)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (in_channels, image_size, image_size)
    prototypes = torch.rand((num_classes, *shape), generator=generator)

    def draw(n: int):
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
        images = prototypes[labels] + noise * torch.randn((n, *shape), generator=generator)
        return images.clamp_(0.0, 1.0), labels

    train_images, train_labels = draw(n_train)
    test_images, test_labels = draw(n_test)
    return SourceData(train_images, train_labels, test_images, test_labels)


@register_dataset(
    "synthetic", num_classes=10, in_channels=1, image_size=8,
    mean=(0.5,), std=(SYNTHETIC_STD,), eps=0.1, augment=None,
)
def synthetic(data_dir: Path, download: bool, verify_checksums: bool) -> SourceData:
    """The default synthetic set (10 classes, 1x8x8, 600 train / 200 test, seed 0); no files involved."""
    return generate_synthetic()


def make_synthetic(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 8,
    n_train: int = 600,
    n_test: int = 200,
    noise: float = 0.1,
    seed: int = 0,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    augment: Optional[str] = None,
) -> DatasetSplits:
    """A synthetic DatasetSplits of any shape (e.g. 3x32x32 to exercise CIFAR-sized models) without files."""
    spec = DatasetSpec(
        name="synthetic",
        load=lambda data_dir, download, verify: generate_synthetic(
            num_classes, in_channels, image_size, n_train, n_test, noise, seed
        ),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=(0.5,) * in_channels,
        std=(SYNTHETIC_STD,) * in_channels,
        eps=0.1,
        augment=augment,
    )
    return spec(val_fraction=val_fraction, split_seed=split_seed)
