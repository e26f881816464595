"""Ray Tune search spaces, one module per defense: ``SPACE``, ``SMOKE_SPACE``, ``METRIC``, ``MODE``.

Spaces are written as functions of the dataset's attack budget eps_data, since
the papers state bounds relative to it (constant perturbations: b = 2 * eps_data).
"""
from __future__ import annotations

import importlib
from types import ModuleType


def search_module(defense: str) -> ModuleType:
    """The tuning module of ``defense`` (``pgd-at`` -> ``tuning.pgd_at``)."""
    return importlib.import_module(f"tuning.{defense.replace('-', '_')}")
