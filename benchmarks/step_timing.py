"""What the training-step benchmarks share: a timed defense step and interleaved repetitions.

A step runs the real code path of the training loop: ``defense.loss`` with a
seeded generator, ``backward``, ``optimizer.step`` and ``defense.after_step``,
on one fixed random batch.  Kinds are timed alternately within each repetition
(the order flips every repetition) so that machine noise hits all of them.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import torch
from torch import nn

from robust.defenses.base import Defense, TrainStep


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_timer(defense: Defense, model: nn.Module, optimizer: torch.optim.Optimizer, batch: int,
               input_shape: tuple, device: torch.device) -> Callable[[int], float]:
    """``timer(n)`` runs n training steps and returns the seconds per step."""
    x = torch.rand(batch, *input_shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    index = torch.arange(batch)
    generator = torch.Generator(device=device).manual_seed(0)
    counter = [0]

    def steps(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            out = defense.loss(TrainStep(model, model, x, y, index, 1, generator))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            counter[0] += 1
            defense.after_step(model, optimizer, counter[0])
        _sync(device)
        return (time.perf_counter() - start) / n

    return steps


def interleaved(timers: Dict[str, Callable[[int], float]], runs: int, steps: int,
                warmup: int) -> Dict[str, List[float]]:
    """Seconds per step of every timer in each of ``runs`` repetitions, after ``warmup`` steps."""
    for timer in timers.values():
        timer(warmup)
    order = list(timers)
    times: Dict[str, List[float]] = {k: [] for k in order}
    for run in range(runs):
        for key in (order if run % 2 == 0 else order[::-1]):
            times[key].append(timers[key](steps))
    return times
