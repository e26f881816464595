#!/usr/bin/env python
"""Cost of a Learn2Perturb training step (no adversarial training) relative to a standard step.

    .venv/bin/python benchmarks/bench_learn2perturb_step.py [--runs 5] [--steps 10] [--threads 2] [--device cpu]

The issue's target: on resnet20 at batch 128 (3x32x32 random inputs), a
Learn2Perturb step without adversarial training (alpha = 1, beta = 0: one noisy
forward pass, the regulariser, one backward pass, one optimiser step over the
W and theta groups, the theta_min projection) costs at most 1.15x a standard
step.  Both steps run the real code path: ``defense.loss`` with the loop's
generator, ``backward``, ``optimizer.step`` (the loop's ``build_optimizer``:
SGD, momentum 0.9, Nesterov, weight decay 1e-4, as A.4) and
``defense.after_step``.  Each run times ``--steps`` steps after 3 warm-up
steps; the two kinds alternate within each repetition (the order flips every
repetition); reported are medians of ``--runs`` and the per-run ratio range.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from robust.defenses import create_defense  # noqa: E402
from robust.models import create_model  # noqa: E402
from robust.train.config import TrainConfig  # noqa: E402
from robust.train.loop import build_optimizer  # noqa: E402
from step_timing import interleaved, step_timer  # noqa: E402

TARGET = 1.15


def _timer(defense_name: str, config: dict, batch: int, device: torch.device):
    torch.manual_seed(0)
    defense = create_defense(defense_name, **config)
    model = defense.prepare_model(create_model("resnet20")).to(device).train()
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return step_timer(defense, model, build_optimizer(defense.param_groups(model), cfg), batch, (3, 32, 32),
                      device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    times = interleaved({"standard": _timer("standard", {}, args.batch, device),
                         "learn2perturb": _timer("learn2perturb", {"alpha": 1.0, "beta": 0.0}, args.batch, device)},
                        args.runs, args.steps, warmup=3)
    ratios = [b / a for a, b in zip(times["standard"], times["learn2perturb"])]
    a, b = statistics.median(times["standard"]), statistics.median(times["learn2perturb"])
    print(f"# Learn2Perturb step (no adversarial training) vs standard step: resnet20, batch {args.batch}, "
          f"{platform.machine()}, {device}, {args.threads} threads, torch {torch.__version__}, "
          f"{args.steps} steps x {args.runs} runs\n")
    print("| standard [ms/step] | learn2perturb [ms/step] | ratio (medians) | per-run range | target |")
    print("|---|---|---|---|---|")
    verdict = "met" if b / a <= TARGET else "missed"
    print(f"| {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.3f}x | {min(ratios):.3f}-{max(ratios):.3f}x "
          f"| <= {TARGET}x: {verdict} |")


if __name__ == "__main__":
    main()
