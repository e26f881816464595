"""Defense registry: ``create_defense(name, eps_data=..., **config)``.

A defense is one file plus the import line below; the training loop consults
the object through the hooks of :class:`robust.defenses.base.Defense` and
never branches on its name.
"""
from __future__ import annotations

from typing import Any, List

from robust.registry import Registry

DEFENSES = Registry("defense")


def _load() -> None:
    # Importing the modules fills the registry (a dict entry each, no work).
    from robust.defenses import constant, pgd_at, standard, stn, trades  # noqa: F401
    from robust.defenses import learn2perturb, pni  # noqa: F401
    from robust.defenses import sdr  # noqa: F401
    from robust.defenses import dropconnect  # noqa: F401
    from robust.defenses import r2, r4  # noqa: F401


def create_defense(name: str, **config: Any):
    _load()
    return DEFENSES.create(name, **config)


def defense_names() -> List[str]:
    _load()
    return DEFENSES.names()
