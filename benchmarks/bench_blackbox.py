#!/usr/bin/env python
"""Black-box and transfer attacks: two design choices measured side by side (CPU).

1. Few-pixel differential evolution scores the whole population of every image
   in batched forward passes; the reference scores one candidate per forward
   pass (what a per-candidate DE loop does).  Same candidates, same numbers.
2. Transfer: a source's adversarial examples are crafted once and classified
   by every target; the reference re-crafts them for each (source, target) pair.

Prints the medians of ``--runs`` timed runs (after one warm-up) and their ratios.

    .venv/bin/python benchmarks/bench_blackbox.py --runs 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from robust.attacks.few_pixel import FewPixel
from robust.evaluation.suite import parse_attacks
from robust.evaluation.transfer import classify_on_target, craft_batches
from robust.models import create_model

CPU = torch.device("cpu")


def _timed(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_population(model, x, y, population: int, runs: int) -> tuple[float, float]:
    attack = FewPixel(pixels=1, population=population, iterations=0, seed=0)
    pop = attack._initial(x, torch.Generator().manual_seed(0))

    def batched():
        return attack._fitness(model, x, y, pop)

    def one_by_one():
        with torch.no_grad():
            xs = attack.apply(x, pop)
            return [model(xs[i, j:j + 1]) for i in range(len(x)) for j in range(population)]

    return _timed(batched, runs), _timed(one_by_one, runs)


def bench_transfer(models, split, targets: int, runs: int) -> tuple[float, float]:
    attacks = parse_attacks(["pgd-20"], 0.1)
    positions = range(64)

    def once():
        batches = craft_batches(models[0], split, positions, attacks, 0.1, CPU, seed=0, batch_size=64)
        for t in models[1:targets + 1]:
            classify_on_target(t, batches, seed=1)

    def per_pair():
        for t in models[1:targets + 1]:
            batches = craft_batches(models[0], split, positions, attacks, 0.1, CPU, seed=0, batch_size=64)
            classify_on_target(t, batches, seed=1)

    return _timed(once, runs), _timed(per_pair, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from robust.data import create_dataset

    digits = create_dataset("digits")
    models = []
    for seed in range(5):
        torch.manual_seed(seed)
        models.append(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8).eval())
    x, y, _ = digits.test.batch(torch.arange(4))
    fast, slow = bench_population(models[0], x, y, population=100, runs=args.runs)
    print(f"few-pixel fitness, 4 images x population 100 (small-cnn 8x8): batched {1e3 * fast:.1f} ms, "
          f"one forward per candidate {1e3 * slow:.1f} ms, speed-up {slow / fast:.1f}x")
    fast, slow = bench_transfer(models, digits.test, targets=4, runs=args.runs)
    print(f"transfer, pgd-20 on 64 examples, 1 source -> 4 targets: craft once {1e3 * fast:.0f} ms, "
          f"craft per pair {1e3 * slow:.0f} ms, speed-up {slow / fast:.2f}x")


if __name__ == "__main__":
    main()
