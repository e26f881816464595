"""What the training-step benchmarks share: a timed defense step and interleaved repetitions.

A step runs the real code path of the training loop: ``defense.loss`` with a
seeded generator, ``backward``, ``optimizer.step`` and ``defense.after_step``,
on one fixed random batch.  Kinds are timed alternately, step by step, within each
repetition (the order flips every step) so that machine noise hits all of them.
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
    """Seconds per step of every timer in each of ``runs`` repetitions, after ``warmup`` steps.

    Within a repetition the kinds alternate step by step (the order flipping every
    step), so a slow stretch of the machine lands on all kinds rather than on the
    one whose block of steps it overlapped.
    """
    for timer in timers.values():
        timer(warmup)
    order = list(timers)
    times: Dict[str, List[float]] = {k: [] for k in order}
    for _ in range(runs):
        total = dict.fromkeys(order, 0.0)
        for step in range(steps):
            for key in (order if step % 2 == 0 else order[::-1]):
                total[key] += timers[key](1)
        for key in order:
            times[key].append(total[key] / steps)
    return times
