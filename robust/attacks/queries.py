"""What black-box attacks share: they only query the model's outputs.

A :class:`QueryAttack` never asks for a gradient: every forward pass runs under
``torch.no_grad``, so it works on a model whose backward raises, or whose
gradients are masked (shattered, zero, or random).  Candidates are scored in
chunks of at most ``query_chunk`` inputs per forward pass (by default the
per-device chunk of :data:`robust.attacks.base.DEFAULT_EOT_CHUNK`: on CPU a few
dozen inputs per pass, on a GPU thousands).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from robust.attacks.base import Attack, default_eot_chunk


class QueryAttack(Attack):
    """Base class of score- and decision-based attacks.

    Args:
        query_chunk: at most this many inputs per forward pass; None chooses per device.
    """

    def __init__(self, query_chunk: Optional[int] = None) -> None:
        if query_chunk is not None and query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1 or None, got {query_chunk}")
        self.query_chunk = query_chunk

    @torch.no_grad()
    def logits(self, model: nn.Module, xs: Tensor) -> Tensor:
        """Model outputs for a stack of queries xs (M, C, H, W), chunked; (M, K)."""
        chunk = self.query_chunk or default_eot_chunk(xs.device)
        return torch.cat([model(xs[i:i + chunk]) for i in range(0, len(xs), chunk)])

    def true_class_probability(self, model: nn.Module, xs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(softmax probability of the label y, fooled = top-1 != y) for queries xs (M,...), y (M,)."""
        logits = self.logits(model, xs).float()
        prob = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
        return prob, logits.argmax(1) != y

    def is_adversarial(self, model: nn.Module, xs: Tensor, y: Tensor) -> Tensor:
        """Decision-only query: top-1 label differs from y, (M,) bool."""
        return self.logits(model, xs).argmax(1) != y


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)
