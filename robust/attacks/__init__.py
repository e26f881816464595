"""Attack registry: ``create_attack(name, eps=..., **hyperparameters)``.

Each attack lives in its own file and registers itself with one decorator line;
``attack(model, x, y)`` returns x_adv in [0,1] inside the attack's threat model.
"""
from __future__ import annotations

from typing import Any, List

from robust.registry import Registry

ATTACKS = Registry("attack")


def _load() -> None:
    # Importing the modules fills the registry (a dict entry each, no work).
    from robust.attacks import apgd, fgsm, pgd, smoothed_pgd  # noqa: F401
    from robust.attacks import apgd_t, cw, deepfool, fab, fgsm_grow, square  # noqa: F401
    from robust.attacks import boundary, few_pixel, local_search  # noqa: F401  (black-box)


def create_attack(name: str, **kwargs: Any):
    _load()
    return ATTACKS.create(name, **kwargs)


def attack_names() -> List[str]:
    _load()
    return ATTACKS.names()
