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

On the CPU the feature noise comes from the native kernels (robust/native); a
third row times the same step on PyTorch's generator (``ROBUST_NATIVE=0``), in
the same run, to show what the kernels save.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from robust import native  # noqa: E402
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
    l2p = {"alpha": 1.0, "beta": 0.0}
    timers = {"standard": _timer("standard", {}, args.batch, device),
              "learn2perturb": _timer("learn2perturb", l2p, args.batch, device)}
    if device.type == "cpu" and native.library() is not None:
        # the same step with PyTorch's generator (ROBUST_NATIVE=0), timed alongside for reference
        timers["learn2perturb, torch.randn"] = _without_native(_timer("learn2perturb", l2p, args.batch, device))
    times = interleaved(timers, args.runs, args.steps, warmup=3)
    base = statistics.median(times["standard"])
    print(f"# Learn2Perturb step (no adversarial training) vs standard step: resnet20, batch {args.batch}, "
          f"{platform.machine()}, {device}, {args.threads} threads, torch {torch.__version__}, "
          f"{args.steps} steps x {args.runs} runs\n")
    print("| step | ms/step (median) | ratio to standard (medians) | per-run range | target |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        ratios = [b / a for a, b in zip(times["standard"], values)]
        ratio = statistics.median(values) / base
        verdict = "" if name == "standard" else (
            f"<= {TARGET}x: {'met' if ratio <= TARGET else 'missed'}" if name == "learn2perturb" else "(reference)")
        print(f"| {name} | {1e3 * statistics.median(values):.1f} | {ratio:.3f}x | "
              f"{min(ratios):.3f}-{max(ratios):.3f}x | {verdict} |")
    if "learn2perturb, torch.randn" in timers:
        _noise_alone(args.batch, args.runs, base)


def _noise_alone(batch: int, runs: int, standard_step: float) -> None:
    """The nine noise modules of resnet20 alone (forward and backward, batch ``batch``):
    the part of the step the kernels change, timed without the rest of the step's noise."""
    from robust.defenses.learn2perturb import FeatureNoise

    model = create_defense("learn2perturb").prepare_model(create_model("resnet20"))
    modules = [m for m in model.modules() if isinstance(m, FeatureNoise)]
    inputs = [torch.randn(batch, *m.theta.shape, requires_grad=True) for m in modules]
    grads = [torch.randn(batch, *m.theta.shape) for m in modules]
    generator = torch.Generator().manual_seed(0)

    def once() -> float:
        start = time.perf_counter()
        for m, h, g in zip(modules, inputs, grads):
            m.generator = generator
            m(h).backward(g)
        return time.perf_counter() - start

    result = {}
    for name, flag in (("native kernels", "1"), ("torch.randn + addcmul", "0")):
        with _native_flag(flag):
            once()
            result[name] = min(once() for _ in range(max(runs, 3) * 2))
    print(f"\nThe nine noise modules alone (forward + backward, best of {max(runs, 3) * 2}):\n")
    print("| noise path | ms/step | share of the standard step's median |")
    print("|---|---|---|")
    for name, seconds in result.items():
        print(f"| {name} | {1e3 * seconds:.1f} | {seconds / standard_step:.1%} |")


@contextmanager
def _native_flag(value: str):
    old = os.environ.get("ROBUST_NATIVE")
    os.environ["ROBUST_NATIVE"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["ROBUST_NATIVE"]
        else:
            os.environ["ROBUST_NATIVE"] = old


def _without_native(timer):
    """``timer`` run with the native kernels switched off (the PyTorch generator path)."""
    def steps(n: int) -> float:
        with _native_flag("0"):
            return timer(n)
    return steps


if __name__ == "__main__":
    main()
