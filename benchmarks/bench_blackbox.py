#!/usr/bin/env python
"""Black-box and transfer attacks: design choices measured side by side (CPU).

1. Few-pixel differential evolution scores the whole population of every image
   in batched forward passes; the reference scores one candidate per forward
   pass (what a per-candidate DE loop does).  Same candidates, same numbers.
2. Transfer: a source's adversarial examples are crafted once and classified
   by every target; the reference re-crafts them for each (source, target) pair.
3. The verdict's rule in black-box attacks on a stochastic model (issue 14): each
   query answered from k draws, "broken" only where every draw misclassifies,
   against single noisy queries (k = 1).  A small-cnn trained 3 epochs on digits,
   deployed as STN's noisy classifier (Gaussian input noise, ``--sigma``); per
   attack and k: queries per example (``attack.queries``), wall time, and the
   verdict's robust score (mean over examples of min(clean, attack) fractions of
   ``--verdict-draws`` fresh draws, a stream of its own).  The attacks run with
   small budgets (below) so that the whole comparison takes minutes.

Prints the medians of ``--runs`` timed runs (after one warm-up) and their ratios
for 1 and 2, one run per attack and k for 3.

    .venv/bin/python benchmarks/bench_blackbox.py --runs 5
    .venv/bin/python benchmarks/bench_blackbox.py --only draws --examples 64
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from robust.attacks import create_attack, verdict
from robust.attacks.few_pixel import FewPixel
from robust.attacks.queries import DEFAULT_QUERY_DRAWS
from robust.attacks.smoothed_pgd import AdditiveNoise
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
        return attack._fitness(model, x, y, pop, torch.arange(len(x)))

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


#: Budgets of the query-draw comparison: small, so that k = 8 finishes in minutes on a CPU.
DRAW_ATTACKS = {"square": ("square", dict(eps=0.1, queries=200)),
                "few-pixel-2": ("few-pixel", dict(eps=2, population=20, iterations=10)),
                "localsearch": ("local-search", dict(eps=math.inf, rounds=10)),
                "boundary": ("boundary", dict(eps=1.5, steps=100, init_tries=20))}


def trained_digits_model(digits):
    from robust.defenses import create_defense
    from robust.train import TrainConfig, fit

    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, mean=digits.mean, std=digits.std)
    cfg = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0, schedule="cosine",
                      val_attack_steps=5)
    model, _ = fit(model, create_defense("standard", eps_data=digits.eps), digits, cfg, seed=0, device=CPU)
    return model.eval()


def bench_query_draws(model, x, y, draws: tuple, verdict_draws: int) -> None:
    """Queries, time and the verdict's robust score of each black-box attack at each k."""
    def score(points):
        with torch.random.fork_rng():
            torch.manual_seed(12345)  # the verdict's own stream, apart from the attacks' draws
            return verdict.correct_fraction(verdict.draw_logits(model, points, verdict_draws, 4096), y)

    clean = score(x)
    print(f"query draws on a stochastic model ({len(x)} digits, small-cnn + Gaussian input noise; verdict over "
          f"{verdict_draws} fresh draws; clean score {clean.mean().item():.3f})")
    print("| attack | k | queries / example (mean) | time [s] | robust score (min of clean, attack) |")
    print("|---|---|---|---|---|")
    for label, (name, params) in DRAW_ATTACKS.items():
        for k in draws:
            torch.manual_seed(1)  # the model's noise
            attack = create_attack(name, seed=0, query_draws=k, **params)
            start = time.perf_counter()
            x_adv = attack(model, x, y)
            elapsed = time.perf_counter() - start
            robust = torch.minimum(clean, score(x_adv)).mean().item()
            print(f"| {label} | {k} | {attack.queries.double().mean().item():.0f} | {elapsed:.1f} | {robust:.3f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["population", "transfer", "draws"], action="append",
                        help="run only these parts (repeatable; default all)")
    parser.add_argument("--examples", type=int, default=64, help="examples of the query-draw comparison")
    parser.add_argument("--sigma", type=float, default=0.3, help="input noise of the stochastic model")
    parser.add_argument("--draws", default=f"1,{DEFAULT_QUERY_DRAWS}", help="values of k to compare")
    parser.add_argument("--verdict-draws", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = set(args.only or ["population", "transfer", "draws"])
    from robust.data import create_dataset

    digits = create_dataset("digits")
    models = []
    for seed in range(5):
        torch.manual_seed(seed)
        models.append(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8).eval())
    if "population" in parts:
        x, y, _ = digits.test.batch(torch.arange(4))
        fast, slow = bench_population(models[0], x, y, population=100, runs=args.runs)
        print(f"few-pixel fitness, 4 images x population 100 (small-cnn 8x8): batched {1e3 * fast:.1f} ms, "
              f"one forward per candidate {1e3 * slow:.1f} ms, speed-up {slow / fast:.1f}x")
    if "transfer" in parts:
        fast, slow = bench_transfer(models, digits.test, targets=4, runs=args.runs)
        print(f"transfer, pgd-20 on 64 examples, 1 source -> 4 targets: craft once {1e3 * fast:.0f} ms, "
              f"craft per pair {1e3 * slow:.0f} ms, speed-up {slow / fast:.2f}x")
    if "draws" in parts:
        noisy = AdditiveNoise(trained_digits_model(digits), sigma=args.sigma).eval()
        x, y, _ = digits.test.batch(torch.arange(args.examples))
        draws = tuple(int(k) for k in args.draws.split(","))
        bench_query_draws(noisy, x, y, draws, args.verdict_draws)


if __name__ == "__main__":
    main()
