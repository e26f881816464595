"""`dropconnect`: the DropConnect baseline of the SDR paper (Khan et al., section 5,
Table 1: "a 3-layer MLP with DropConnect (p = 0.2)"; Wan et al., ICML 2013).

Every weight of every ``nn.Linear`` and ``nn.Conv2d`` is dropped with
probability p at each forward pass and the kept ones are scaled by 1 / (1 - p),
so the expected weight is the stored one (see
:class:`robust.models.stochastic.DropConnectNoise`).  Choices, and why:

* Masks are drawn at inference too (``sample_at_inference=True``): the SDR
  paper uses DropConnect as a *non-deterministic* baseline whose
  "non-determinism results in an improvement in adversarial robustness"
  (section 5).  With False, eval mode uses the expected weights (Wan et al.
  instead approximate the output distribution by moment matching).
* One mask per batch by default (as SDR samples weights, Algorithm 2 line 6);
  ``per_example=True`` draws one per example as in Wan et al.'s formulation.
* Biases are not dropped (Wan et al. mask the weight matrix).
* Inverted scaling at training time, so no rescaling is needed at test time.

Training draws and the selection metric ``val_eot_pgd_acc`` are those of
:class:`robust.defenses.sdr.StochasticWeights`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from robust.defenses import DEFENSES
from robust.defenses.sdr import StochasticWeights, check_validation_settings
from robust.models.stochastic import DropConnectNoise, to_stochastic


@dataclass
class DropConnectConfig:
    """p: drop probability of each weight (SDR paper Table 1: 0.2); masks per batch or
    per example; sampled at inference or replaced by their expectation there."""

    p: float = 0.2
    per_example: bool = False
    sample_at_inference: bool = True
    val_examples: int = 200
    val_steps: int = 10
    val_eot_samples: int = 8

    def __post_init__(self) -> None:
        check_validation_settings("dropconnect", self)
        if not 0 <= self.p < 1:
            raise ValueError(f"dropconnect p must lie in [0, 1), got {self.p}")


@DEFENSES.register("dropconnect")
class DropConnect(StochasticWeights):
    name = "dropconnect"

    def __init__(self, eps_data: float = 8 / 255, **config: Any) -> None:
        super().__init__(DropConnectConfig(**config), eps_data)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        return to_stochastic(model, lambda layer: DropConnectNoise(cfg.p, cfg.sample_at_inference),
                             per_example=cfg.per_example)
