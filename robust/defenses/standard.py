"""`standard`: plain empirical-risk training with cross-entropy (model A of Table 9 in
the constant-perturbation paper).  No defense: the baseline every table needs."""
from __future__ import annotations

from dataclasses import dataclass

from robust.defenses import DEFENSES
from robust.defenses.base import Defense


@dataclass
class StandardConfig:
    """Plain training has no hyperparameters of its own."""


@DEFENSES.register("standard")
class Standard(Defense):
    name = "standard"

    def __init__(self, eps_data: float = 0.0, **config) -> None:
        super().__init__(StandardConfig(**config))
