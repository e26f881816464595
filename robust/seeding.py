"""Counter-based seeding: any piece of randomness is a pure function of its coordinates.

``derive_seed(seed, a, b, ...)`` mixes integers with SplitMix64 (Steele et al.
2014), so that e.g. the j-th constant perturbation of example i is the same on
whichever worker, in whichever order, and with however many workers it is
generated.
"""
from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def derive_seed(*coordinates: int) -> int:
    """A 63-bit seed that depends on every coordinate and on their order."""
    state = 0x243F6A8885A308D3
    for c in coordinates:
        state = _splitmix64(state ^ (int(c) & _MASK))
    return state & ((1 << 63) - 1)


def generator(*coordinates: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded by ``derive_seed(*coordinates)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*coordinates))
