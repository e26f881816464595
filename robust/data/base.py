"""In-memory splits, the dataset description, and the validation carve-out.

Every dataset is loaded as a *source*: its official training and test splits as
tensors.  ``DatasetSpec`` turns a source into ``DatasetSplits`` by carving a
validation split out of the training data with a fixed seed, so that model
selection (Tune metrics, best seed, early stopping) never reads the test split.

Each example carries ``index``, its position in its source split.  Per-example
randomness (the constant perturbations of a training example, the EOT or
certification noise of a test example) is seeded from that index, so it does not
depend on the batch order, the worker or the validation carve-out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from robust.registry import Registry

DATASETS = Registry("dataset")

AUGMENTS = (None, "crop-flip", "crop")


def _as_positions(positions: Union[Tensor, Sequence[int]]) -> Tensor:
    return torch.as_tensor(positions, dtype=torch.long)


class ImageSplit(torch.utils.data.Dataset):
    """One split held in memory.

    images: uint8 (N, C, H, W) in 0..255 (compact, for the torchvision datasets)
        or float32 (N, C, H, W) in [0, 1].
    labels: int64 (N,).
    indices: int64 (N,), the stable position of each example in its source
        split, used to seed per-example noise.

    Items always come out as float32 images in [0, 1]; the storage dtype is an
    implementation detail.
    """

    def __init__(self, images: Tensor, labels: Tensor, indices: Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images must be uint8 or float32, got {images.dtype}")
        if labels.dtype != torch.int64 or indices.dtype != torch.int64:
            raise ValueError(f"labels and indices must be int64, got {labels.dtype} and {indices.dtype}")
        if not len(images) == len(labels) == len(indices):
            raise ValueError(
                f"images, labels and indices differ in length: {len(images)}, {len(labels)}, {len(indices)}"
            )
        self.images = images
        self.labels = labels
        self.indices = indices

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def _to_float(images: Tensor) -> Tensor:
        """A new float32 tensor in [0, 1]: callers may modify it in place (add noise) without touching the split."""
        if images.dtype == torch.uint8:
            return images.to(torch.float32).div_(255.0)
        return images.to(torch.float32, copy=True)

    def __getitem__(self, n: int) -> Tuple[Tensor, Tensor, Tensor]:
        """(image float32 [0,1] (C, H, W), label int64 scalar, index int64 scalar)."""
        return self._to_float(self.images[n]), self.labels[n], self.indices[n]

    def batch(self, positions: Union[Tensor, Sequence[int]]) -> Tuple[Tensor, Tensor, Tensor]:
        """Vectorised gather of many items: (images float32 (B, C, H, W), labels (B,), indices (B,))."""
        positions = _as_positions(positions)
        return self._to_float(self.images[positions]), self.labels[positions], self.indices[positions]

    def subset(self, positions: Union[Tensor, Sequence[int]]) -> "ImageSplit":
        """The split restricted to ``positions`` (in that order); each example keeps its index."""
        positions = _as_positions(positions)
        return ImageSplit(self.images[positions], self.labels[positions], self.indices[positions])

    def __repr__(self) -> str:
        return f"ImageSplit(n={len(self)}, shape={tuple(self.images.shape[1:])}, dtype={self.images.dtype})"


@dataclass
class DatasetSplits:
    """A dataset ready for training: three splits and the constants a model and an attack need."""

    name: str
    train: ImageSplit
    val: ImageSplit  # carved from the training data with a fixed seed (split_seed)
    test: ImageSplit  # used only for final reporting
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]  # per-channel, for the model's Normalize layer
    std: Tuple[float, ...]
    eps: float  # documented L-inf attack budget eps_data for this dataset
    augment: Optional[str]  # "crop-flip", "crop" or None


@dataclass
class SourceData:
    """A dataset's official splits, as loaded: images (N, C, H, W) uint8 or float32 in [0,1], labels int64."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in the open interval (0, 1), got {val_fraction}")


def carve_validation(n: int, val_fraction: float, split_seed: int) -> Tuple[Tensor, Tensor]:
    """Positions (train, val) of a seeded permutation of range(n); val has round(val_fraction * n) of them.

    Both keep the permutation's order, so the first k training positions are a
    random, seed-determined subset (what ``max_train`` keeps).
    """
    check_val_fraction(val_fraction)
    n_val = round(val_fraction * n)
    if not 0 < n_val < n:
        raise ValueError(
            f"val_fraction={val_fraction} of {n} training examples leaves an empty train or validation split"
        )
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return permutation[n_val:], permutation[:n_val]


def default_data_dir(data_dir: Union[str, os.PathLike, None] = None) -> Path:
    """``data_dir`` if given, else $ROBUST_DATA_DIR, else ~/.cache/robust-data."""
    if data_dir is None:
        data_dir = os.environ.get("ROBUST_DATA_DIR") or Path.home() / ".cache" / "robust-data"
    return Path(data_dir).expanduser()


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its constants (readable without loading) and its source loader.

    ``load(data_dir, download, verify_checksums) -> SourceData`` reads the official
    splits; calling the spec adds the validation carve-out and returns DatasetSplits.
    """

    name: str
    load: Callable[[Path, bool, bool], SourceData] = field(repr=False)
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    eps: float
    augment: Optional[str]
    #: sizes of the official train and test splits (before the validation carve-out),
    #: known without loading, for cost estimates; 0 where unknown
    train_size: int = 0
    test_size: int = 0

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise ValueError(f"dataset {self.name!r}: augment must be one of {AUGMENTS}, got {self.augment!r}")
        if not len(self.mean) == len(self.std) == self.in_channels:
            raise ValueError(f"dataset {self.name!r}: mean and std need one value per channel")

    def __call__(
        self,
        data_dir: Union[str, os.PathLike, None] = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        download: bool = True,
        max_train: Optional[int] = None,
        verify_checksums: bool = True,
    ) -> DatasetSplits:
        check_val_fraction(val_fraction)  # before any loading or download
        if max_train is not None and max_train < 1:
            raise ValueError(f"max_train must be a positive number of examples, got {max_train}")
        source = self.load(default_data_dir(data_dir), download, verify_checksums)
        full_train = ImageSplit(
            source.train_images, source.train_labels, torch.arange(len(source.train_labels))
        )
        train_positions, val_positions = carve_validation(len(full_train), val_fraction, split_seed)
        if max_train is not None:
            train_positions = train_positions[:max_train]
        test = ImageSplit(source.test_images, source.test_labels, torch.arange(len(source.test_labels)))
        splits = DatasetSplits(
            name=self.name,
            train=full_train.subset(train_positions),
            val=full_train.subset(val_positions),
            test=test,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            eps=self.eps,
            augment=self.augment,
        )
        self._check_shapes(splits)
        return splits

    def _check_shapes(self, splits: DatasetSplits) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        for split_name in ("train", "val", "test"):
            shape = tuple(getattr(splits, split_name).images.shape[1:])
            if shape != expected:
                raise ValueError(f"dataset {self.name!r}: {split_name} images are {shape}, expected {expected}")


def register_dataset(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    eps: float,
    augment: Optional[str],
    train_size: int = 0,
    test_size: int = 0,
) -> Callable[[Callable[[Path, bool, bool], SourceData]], DatasetSpec]:
    """Decorator: register ``load(data_dir, download, verify_checksums) -> SourceData`` as dataset ``name``."""

    def decorator(load: Callable[[Path, bool, bool], SourceData]) -> DatasetSpec:
        spec = DatasetSpec(
            name=name,
            load=load,
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            eps=float(eps),
            augment=augment,
            train_size=int(train_size),
            test_size=int(test_size),
        )
        return DATASETS.register(name)(spec)

    return decorator
