"""Compute-cost estimates for planning a run before spending on it.

Forward FLOPs per example are counted with ``torch.utils.flop_counter`` on a
copy of the model moved to the ``meta`` device, so no data is touched and no
arithmetic is done (WRN-28-10 at 32x32: 10.5 GFLOPs, i.e. 5.2 GMACs).  A
training step costs about 3 forward passes (forward + backward, the backward
pass twice the forward); attacks and defenses multiply that by their passes.
GPU-hours divide the total by an assumed sustained throughput per GPU,
``gpu_tflops`` (default 40 TFLOP/s: about an eighth of an A100's bf16 peak,
what mixed-precision WRN training sustains end to end: 700 epochs of WRN-28-10
on CIFAR-10 come out near 7 GPU-hours).  It is an order-of-
magnitude plan, not a quote: data loading, communication and the idle GPUs of
an uneven search are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

#: forward + backward of one example, in forward passes
TRAIN_STEP_PASSES = 3.0
DEFAULT_GPU_TFLOPS = 40.0


def forward_flops(model_name: str, dataset: str, model_config: Mapping[str, Any] | None = None) -> float:
    """FLOPs (2 per multiply-add) of one example's forward pass through ``model_name``."""
    from robust.data import DATASETS
    from robust.models import create_model

    ds = DATASETS.get(dataset)
    model = create_model(model_name, num_classes=ds.num_classes, in_channels=ds.in_channels,
                         image_size=ds.image_size, mean=ds.mean, std=ds.std, **dict(model_config or {}))
    model = model.to("meta").eval()
    x = torch.zeros(1, ds.in_channels, ds.image_size, ds.image_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def attack_passes(params: Mapping[str, Any]) -> float:
    """Forward passes per example of one evaluation attack, from its hyperparameters."""
    steps = int(params.get("steps", 1))
    eot = int(params.get("eot_samples", 1))
    restarts = max(1, int(params.get("restarts", 1)))
    return TRAIN_STEP_PASSES * steps * eot * restarts + 1.0


@dataclass(frozen=True)
class CostEstimate:
    flops_per_example: float
    train_flops: float      # all trials, training and validation
    eval_flops: float       # all trials, test evaluation
    gpu_hours: float
    gpu_tflops: float

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.eval_flops


def estimate(*, flops_per_example: float, trials: int, epochs: int, train_examples: int,
             val_examples: int, test_examples: int, defense_passes: float, val_attack_steps: int,
             val_attack_every: int, attack_params: Iterable[Dict[str, Any]],
             gpu_tflops: float = DEFAULT_GPU_TFLOPS) -> CostEstimate:
    """Total FLOPs of a search and its evaluation, and the GPU-hours they take at ``gpu_tflops``."""
    if gpu_tflops <= 0:
        raise ValueError(f"gpu_tflops must be > 0, got {gpu_tflops}")
    per_epoch = train_examples * TRAIN_STEP_PASSES * defense_passes
    val_attacks = epochs / max(1, val_attack_every)
    validation = epochs * val_examples + val_attacks * val_examples * (TRAIN_STEP_PASSES * val_attack_steps + 1)
    train = trials * flops_per_example * (epochs * per_epoch + validation)
    evaluation = trials * flops_per_example * test_examples * (
        1.0 + sum(attack_passes(p) for p in attack_params))
    hours = (train + evaluation) / (gpu_tflops * 1e12) / 3600.0
    return CostEstimate(flops_per_example, train, evaluation, hours, gpu_tflops)
