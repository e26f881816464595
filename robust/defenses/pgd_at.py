"""`pgd-at`: PGD adversarial training (Madry et al., ICLR 2018).

min_theta E[max_{||delta||_inf <= eps} CE(f(x + delta), y)], the inner maximum
approximated by PGD with a random start.  Paper preset (CIFAR-10): PGD-7,
eps = 8/255, step 2/255, as the comparison in Table 3 of the
constant-perturbation paper uses.  Adversarial examples are generated on the
unwrapped model in eval mode (batch-norm statistics are not updated by the
attack's passes); the training pass then runs in train mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from robust.attacks.pgd import PGD
from robust.defenses import DEFENSES
from robust.defenses.base import BatchLoss, Defense, TrainStep
from robust.seeding import derive_seed


@dataclass
class PGDATConfig:
    """eps: L-inf training budget (the dataset's eps_data unless given; 8/255 on CIFAR-10);
    step_size: PGD step (eps/4 unless given: 2/255 for eps 8/255, Madry et al.); steps: 7."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 7

    def __post_init__(self) -> None:
        if self.eps <= 0 or self.step_size <= 0:
            raise ValueError(f"pgd-at eps and step_size must be > 0, got {self.eps}, {self.step_size}")
        if self.steps < 1:
            raise ValueError(f"pgd-at steps must be >= 1, got {self.steps}")


@DEFENSES.register("pgd-at")
class PGDAdversarialTraining(Defense):
    name = "pgd-at"

    def __init__(self, eps_data: float = 8 / 255, **config) -> None:
        config.setdefault("eps", eps_data)
        config.setdefault("step_size", config["eps"] / 4)
        super().__init__(PGDATConfig(**config))
        self._batches = 0

    def train_passes(self) -> float:
        return 1.0 + self.config.steps  # one forward+backward per PGD step, then the training pass

    def loss(self, step: TrainStep) -> BatchLoss:
        cfg = self.config
        # A fresh random start per batch, reproducible from (epoch, batch counter).
        self._batches += 1
        attack = PGD(eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps, random_start=True,
                     seed=derive_seed(step.epoch, self._batches, int(step.index[0])))
        x_adv = attack(step.module, step.x, step.y)  # the attack restores train mode
        logits = step.model(x_adv)
        return BatchLoss(F.cross_entropy(logits, step.y), logits)
