"""Datasets as in-memory splits (train, validation carved with a fixed seed, test) plus batched augmentation.

    splits = create_dataset("digits")              # embedded, no download
    x, y, idx = splits.train.batch(positions)      # float32 [0,1], labels, stable indices
    x = augment_batch(x, splits.augment, generator)

Importing this package loads no data and imports neither torchvision nor
scikit-learn; each dataset module only adds a registry entry.
"""
from __future__ import annotations

import os
from typing import List, Optional, Union

from robust.data.augment import augment_batch
from robust.data.base import DATASETS, DatasetSplits, DatasetSpec, ImageSplit, SourceData, register_dataset
from robust.data import digits as _digits  # noqa: F401  (registers "digits")
from robust.data import synthetic as _synthetic  # noqa: F401  (registers "synthetic")
from robust.data import torchvision_datasets as _torchvision_datasets  # noqa: F401  (cifar10, cifar100, svhn, mnist, fashion-mnist)
from robust.data.synthetic import make_synthetic

__all__ = [
    "DATASETS", "DatasetSplits", "DatasetSpec", "ImageSplit", "SourceData", "register_dataset",
    "augment_batch", "create_dataset", "dataset_eps", "dataset_names", "make_synthetic",
]


def create_dataset(
    name: str,
    data_dir: Union[str, os.PathLike, None] = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    download: bool = True,
    max_train: Optional[int] = None,
    *,
    verify_checksums: bool = True,
) -> DatasetSplits:
    """Load dataset ``name`` as train / val / test splits.

    data_dir: where downloaded datasets live (default $ROBUST_DATA_DIR, else
        ~/.cache/robust-data); unused by "digits" and "synthetic".
    val_fraction: share of the source training split held out for validation,
        in (0, 1); the carve-out is a torch.Generator(split_seed) permutation.
    download: fetch missing files (under a file lock); if False, missing files
        raise FileNotFoundError naming the dataset and the directory.
    max_train: keep only the first max_train training examples of the seeded
        permutation (smoke tests); validation and test are unchanged.
    verify_checksums: if False, torchvision's md5 checks of the extracted files
        only test that they exist (fake files in tests, a re-packed mirror).
    """
    return DATASETS.create(
        name, data_dir=data_dir, val_fraction=val_fraction, split_seed=split_seed,
        download=download, max_train=max_train, verify_checksums=verify_checksums,
    )


def dataset_names() -> List[str]:
    return DATASETS.names()


def dataset_eps(name: str) -> float:
    """The documented L-inf budget eps_data of ``name``, without loading any data."""
    return DATASETS.get(name).eps
