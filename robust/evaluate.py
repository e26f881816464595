"""Per-example evaluation of a trained model under a list of attacks.

Every row is one (example, attack): the prediction is recomputed from the
adversarial input after the attack returns, never carried over from inside
the attack.  Work is split into fixed shards of example positions so that a
retried shard regenerates the same numbers (its attack seeds derive from
(seed, shard)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from robust.attacks import create_attack
from robust.data.base import ImageSplit
from robust.device import prepare_input
from robust.seeding import derive_seed

CLEAN = "clean"


@dataclass(frozen=True)
class AttackSpec:
    """An evaluation attack: registry name plus hyperparameters; eps defaults to eps_data.

    ``step_fraction`` gives a PGD step as a fraction of eps (0.25: 2/255 at eps 8/255,
    the constant-perturbation paper's setting).
    """

    name: str
    params: Dict[str, Any]

    @classmethod
    def parse(cls, spec: Dict[str, Any]) -> "AttackSpec":
        spec = dict(spec)
        return cls(spec.pop("name"), spec)

    @property
    def label(self) -> str:
        """Name used in results: 'fgsm', 'pgd-20', ..."""
        steps = self.params.get("steps")
        return f"{self.name}-{steps}" if steps is not None else self.name

    def eps(self, eps_data: float) -> float:
        return float(self.params.get("eps", eps_data))

    def build(self, eps_data: float, seed: int):
        params = dict(self.params)
        eps = float(params.pop("eps", eps_data))
        fraction = params.pop("step_fraction", None)
        if fraction is not None:
            params["step_size"] = fraction * eps
        if self.name == "pgd":
            params.setdefault("seed", seed)
        return create_attack(self.name, eps=eps, **params)


def shard_positions(n: int, shard_size: int) -> List[range]:
    """Fixed contiguous shards of ``range(n)``: the same for 1 worker or 8."""
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def evaluate_shard(module: nn.Module, split: ImageSplit, positions: Sequence[int],
                   attacks: Sequence[AttackSpec], eps_data: float, device: torch.device,
                   seed: int, shard: int, batch_size: int = 256,
                   progress: Optional[Callable[[int], None]] = None) -> Dict[str, Dict[str, list]]:
    """Evaluate ``positions`` of ``split`` clean and under each attack.

    Returns {attack label: columns} with columns example, label, prediction,
    correct, eps (lists of equal length).  ``progress(n)`` is called after each
    batch with the number of examples finished.
    """
    module.eval()
    built = [(CLEAN, 0.0, None)] + [
        (a.label, a.eps(eps_data), a.build(eps_data, derive_seed(seed, shard, i)))
        for i, a in enumerate(attacks)
    ]
    out: Dict[str, Dict[str, list]] = {
        label: {"example": [], "label": [], "prediction": [], "correct": [], "eps": []}
        for label, _, _ in built
    }
    positions = list(positions)
    for start in range(0, len(positions), batch_size):
        x, y, index = split.batch(torch.as_tensor(positions[start:start + batch_size]))
        x, y = prepare_input(x, device), y.to(device)
        for label, eps, attack in built:
            x_eval = x if attack is None else attack(module, x, y)
            with torch.no_grad():
                pred = module(x_eval).argmax(1)
            cols = out[label]
            cols["example"] += index.tolist()
            cols["label"] += y.tolist()
            cols["prediction"] += pred.tolist()
            cols["correct"] += (pred == y).tolist()
            cols["eps"] += [eps] * len(y)
        if progress is not None:
            progress(len(y))
    return out
