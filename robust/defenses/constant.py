"""`constant` and `variable`: training on randomly perturbed copies of the examples.

Constant random perturbations (Chernyak, Raj, Hazan & Keshet; section 2):
each training example x_i gets K perturbations delta_ij ~ q_b, drawn once at the
outset and fixed for the whole training; the network is trained on the extended
set S-bar of size K*M (eq. 3-4), by default together with the clean examples
(the paper's method G in Table 9; ``keep_clean=False`` gives eq. 3 exactly).
q_b is U(-b, b) (the paper's choice) or N(0, b^2) (std b, Table 4 and Table 9 D/E).
Perturbed images are clipped to [0, 1].

Paper defaults: K = 10, b = 16/255 on CIFAR-10, chosen as twice the attack
budget eps_data (A.1: "twice the size of the epsilon that was used in the most
successful FGSM and PGD attacks").  So b defaults to 2 * eps_data.

The extended set is never materialised: delta_ij is a pure function of
(seed, example index i, j), see :func:`perturbation`, so every Ray worker
regenerates exactly the perturbations of its shard.  Perturbations are added
to the un-augmented image; the dataset's standard augmentation (crop/flip) is
applied afterwards by the training loop, as ordinary training on S-bar would do.

`variable` is the paper's ablation (A.4, Table 9 B-E): fresh perturbations every
epoch, i.e. delta is a function of (seed, epoch, i, j).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from robust.data.base import ImageSplit
from robust.defenses import DEFENSES
from robust.defenses.base import Defense
from robust.seeding import derive_seed

DISTRIBUTIONS = ("uniform", "gaussian")


def perturbation(seed: int, index: int, j: int, shape: Sequence[int], bound: float,
                 distribution: str, epoch: Optional[int] = None) -> Tensor:
    """delta_ij of example ``index``: U(-bound, bound) or N(0, bound^2), float32, shape ``shape``.

    A pure function of its arguments (``epoch`` only for variable perturbations).
    """
    coords = (seed, index, j) if epoch is None else (seed, index, j, epoch)
    g = torch.Generator().manual_seed(derive_seed(*coords))
    if distribution == "uniform":
        return (2.0 * torch.rand(tuple(shape), generator=g) - 1.0) * bound
    if distribution == "gaussian":
        return torch.randn(tuple(shape), generator=g) * bound
    raise ValueError(f"unknown distribution {distribution!r}; valid choices: {', '.join(DISTRIBUTIONS)}")


class PerturbedSplit(Dataset):
    """The extended training set S-bar, generated on the fly.

    Item n maps to example position i = n mod M and copy c = n div M.  With
    ``keep_clean`` copy 0 is the clean image and copies 1..K are perturbed
    (perturbation j = c); without it copies 0..K-1 are perturbations j = c + 1.
    Items: (image float32 in [0,1], label, example index).
    """

    def __init__(self, split: ImageSplit, copies: int, bound: float, distribution: str,
                 keep_clean: bool, seed: int, fresh_each_epoch: bool = False) -> None:
        self.split = split
        self.copies = copies
        self.bound = bound
        self.distribution = distribution
        self.keep_clean = keep_clean
        self.seed = seed
        self.fresh_each_epoch = fresh_each_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split) * (self.copies + int(self.keep_clean))

    def _locate(self, n: int) -> Tuple[int, int]:
        m = len(self.split)
        position, copy = n % m, n // m
        j = copy if self.keep_clean else copy + 1
        return position, j

    def __getitem__(self, n: int) -> Tuple[Tensor, Tensor, Tensor]:
        position, j = self._locate(int(n))
        image, label, index = self.split[position]
        if j > 0:
            epoch = self.epoch if self.fresh_each_epoch else None
            delta = perturbation(self.seed, int(index), j, image.shape, self.bound,
                                 self.distribution, epoch)
            image = torch.clamp(image + delta, 0.0, 1.0)
        return image, label, index

    def batch(self, positions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        items = [self[int(n)] for n in positions]
        return (torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]),
                torch.stack([it[2] for it in items]))


@dataclass
class ConstantConfig:
    """K (``copies``) perturbations per example from ``distribution`` with bound b (``bound``).

    Paper preset: copies = 10, bound = 16/255 (= 2 * eps_data on CIFAR-10),
    uniform, clean examples kept (section 3, A.1, Table 9 G).
    """

    bound: float = 16 / 255
    copies: int = 10
    distribution: str = "uniform"
    keep_clean: bool = True

    def __post_init__(self) -> None:
        if not self.bound > 0:
            raise ValueError(f"bound b must be > 0, got {self.bound}")
        if int(self.copies) != self.copies or self.copies < 1:
            raise ValueError(f"number of perturbations K must be an integer >= 1, got {self.copies}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.distribution!r}; valid choices: "
                             f"{', '.join(DISTRIBUTIONS)}")


@DEFENSES.register("constant")
class ConstantPerturbations(Defense):
    """Constant random perturbations; drawn once, a function of (seed, i, j)."""

    name = "constant"
    fresh_each_epoch = False

    def __init__(self, eps_data: float = 8 / 255, **config) -> None:
        config.setdefault("bound", 2 * eps_data)  # A.1: b = 2 * eps_data
        super().__init__(ConstantConfig(**config))

    def train_dataset(self, split: ImageSplit, seed: int) -> Dataset:
        cfg = self.config
        return PerturbedSplit(split, cfg.copies, cfg.bound, cfg.distribution, cfg.keep_clean,
                              seed, fresh_each_epoch=self.fresh_each_epoch)


@dataclass
class VariableConfig(ConstantConfig):
    """Table 9 ablations: B (uniform, keep_clean=False), C (uniform, clean kept),
    D (gaussian, no clean), E (gaussian, clean kept); one fresh draw per epoch (copies = 1)."""

    copies: int = 1
    keep_clean: bool = False


@DEFENSES.register("variable")
class VariablePerturbations(ConstantPerturbations):
    """Fresh perturbations every epoch: delta is a function of (seed, epoch, i, j)."""

    name = "variable"
    fresh_each_epoch = True

    def __init__(self, eps_data: float = 8 / 255, **config) -> None:
        config.setdefault("bound", 2 * eps_data)
        Defense.__init__(self, VariableConfig(**config))
