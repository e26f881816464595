"""Training configuration: one dataclass, defaults written once here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("multistep", "cosine", "constant")


@dataclass
class TrainConfig:
    """Optimiser, schedule and validation settings of the single training loop.

    ``val_attack_steps``/``val_attack_every``: the validation metric that Tune
    optimises is PGD accuracy on the validation split (never the test split),
    computed every ``val_attack_every`` epochs and at the last epoch.
    ``milestones`` are fractions of ``epochs`` for the multistep schedule.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])
    lr_decay: float = 0.1
    eval_batch_size: int = 256
    val_attack_steps: int = 10
    val_attack_every: int = 1
    amp: bool = True  # used only on CUDA; certification never uses it

    def __post_init__(self) -> None:
        if int(self.epochs) != self.epochs or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid choices: {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.val_attack_every < 1:
            raise ValueError(f"val_attack_every must be >= 1, got {self.val_attack_every}")
