#!/usr/bin/env python
"""Cost of an SDR-Learnable training step relative to a standard step.

    .venv/bin/python benchmarks/bench_sdr_step.py [--runs 5] [--steps 20] [--threads 2] [--device cpu]

The SDR paper (section 6) says the technique costs "at most twice the number of
original parameters"; the issue asks that a training step cost at most 2.2x a
standard one.  Both steps run the real code path: ``defense.loss`` (the
defense's loss with the loop's generator), ``backward``, ``optimizer.step``
(Adam) and ``defense.after_step`` (SDR: the clamp of Algorithm 3), on the same
model architecture, same random batch, same device.  Models: ``mlp3`` at
batch 128 on 1x28x28 (the paper's MNIST MLP) and ``resnet20`` at batch 128 on
3x32x32.  Each run times ``--steps`` steps after 2 warm-up steps; the standard
and SDR runs alternate within each repetition; medians of ``--runs``.
"""
from __future__ import annotations

import argparse
import platform
import statistics

import torch

from robust.defenses import create_defense
from robust.models import create_model
from step_timing import interleaved, step_timer

CASES = (("mlp3", 1, 28), ("resnet20", 3, 32))


def _timer(name: str, channels: int, size: int, defense_name: str, batch: int, device: torch.device):
    torch.manual_seed(0)
    defense = create_defense(defense_name)
    model = defense.prepare_model(create_model(name, in_channels=channels, image_size=size)).to(device).train()
    optimizer = torch.optim.Adam(defense.param_groups(model), lr=1e-3)
    return step_timer(defense, model, optimizer, batch, (channels, size, size), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="mlp3,resnet20", help="comma-separated subset of mlp3,resnet20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# SDR-Learnable step vs standard step ({platform.processor() or platform.machine()}, "
          f"{device}, {args.threads} threads, torch {torch.__version__}, batch {args.batch}, "
          f"{args.steps} steps x {args.runs} runs)\n")
    print("| model | standard [ms/step] | sdr learnable [ms/step] | ratio |")
    print("|---|---|---|---|")
    for name, channels, size in [c for c in CASES if c[0] in args.models.split(",")]:
        times = interleaved({"standard": _timer(name, channels, size, "standard", args.batch, device),
                             "sdr": _timer(name, channels, size, "sdr", args.batch, device)},
                            args.runs, args.steps, warmup=2)
        a, b = statistics.median(times["standard"]), statistics.median(times["sdr"])
        print(f"| {name} | {1e3 * a:.2f} | {1e3 * b:.2f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
