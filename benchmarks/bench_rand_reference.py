#!/usr/bin/env python
"""The rand protocol: our `apgd-rand` against torchattacks, and its cost before/after issue 14.

A benchmark, not a test (pytest never collects ``benchmarks/``).  Two parts:

1. Strength (``--part compare``): on the `pni` defense and on an external model
   with per-example input noise, our `apgd-rand` (APGD-CE and APGD-DLR as the
   evaluation builds them, 100 steps, S = 20 EOT samples) against torchattacks
   3.5.1's ``APGD`` with ``loss`` 'ce'/'dlr', ``eot_iter`` = 20, one restart, the
   same eps; both sides' points judged by the verdict on the same R = 20 seeded
   draws (``tests/rand_reference.py`` states the rule).  Printed: clean accuracy,
   both robust accuracies with 95% intervals, the paired difference with its
   interval, and both sides' attack times.
2. Cost of the new rules (``--part cost``): APGD-rand on the same model and batch
   with the code before issue 14 (``--before``, a checkout of commit e98a8c2,
   run in a subprocess with ``PYTHONPATH`` and cwd there) and with this tree
   (a subprocess too), alternating the order over ``--runs`` repetitions.  Each
   subprocess makes one short warm-up call, then times one call of (a) the two attacks alone and
   (b) ``evaluate_shard`` with ``apgd-rand`` and the protocol's defaults (R = 10
   verdict draws; after issue 14 also the "EOT not converged" check: both attacks
   again with 2S samples on the first ``check_examples`` examples of the batch),
   and counts the model's forward passes and the inputs they carried.
   Deterministic and stochastic models are reported separately.

Models (trained here, a few minutes on 1 thread): small-cnn on the embedded
digits, standard training (the deterministic model; wrapped in N(0, 0.3^2)
per-example input noise it is the external stochastic model) and PNI-W trained
from scratch with PGD (the `pni` model).  eps = digits' eps_data, 0.1.

    .venv/bin/pip install --no-deps torchattacks==3.5.1
    git worktree add /tmp/orig e98a8c2        # the code before issue 14, read-only
    .venv/bin/python benchmarks/bench_rand_reference.py --before /tmp/orig

``--threads`` defaults to 1: on a shared 2-core machine two OpenMP threads per
process spin against the other jobs (a small-cnn pass on 32 images took 6x
longer with 2 threads than with 1 at load ~6), and 8x8 inputs gain nothing from
a second thread.  Timings on a loaded machine are noisy: medians are reported
with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = REPO_ROOT / "tests"
#: Model kinds of the cost part: (name, deterministic?).
KINDS = ("deterministic", "pni", "per-example-noise")


def _load_avg() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


# ---------------------------------------------------------------- models

def train_models(state_dir: Path, epochs: int, pni_epochs: int, pni_steps: int) -> None:
    """Train the standard and the PNI small-cnn on digits; save their state dicts."""
    from rand_reference import train_pni, train_standard
    from robust.data import create_dataset

    digits = create_dataset("digits")
    start = time.perf_counter()
    torch.save(train_standard(digits, epochs).state_dict(), state_dir / "standard.pt")
    torch.save(train_pni(digits, pni_epochs, train_steps=pni_steps).state_dict(), state_dir / "pni.pt")
    print(f"trained standard ({epochs} epochs) and pni ({pni_epochs} epochs, PGD-{pni_steps}) "
          f"in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def load_model(kind: str, state_dir: Path, digits):
    """The model of ``kind`` from the saved weights (works with either tree's ``robust``)."""
    from helpers import NoisyInput
    from rand_reference import INPUT_NOISE_SIGMA, small_cnn
    from robust.defenses import create_defense

    model = small_cnn(digits, 0)
    if kind == "pni":
        create_defense("pni", eps_data=digits.eps).prepare_model(model)
        model.load_state_dict(torch.load(state_dir / "pni.pt"))
        return model.eval()
    model.load_state_dict(torch.load(state_dir / "standard.pt"))
    return (NoisyInput(model, INPUT_NOISE_SIGMA) if kind == "per-example-noise" else model).eval()


# ---------------------------------------------------------------- part 1: strength

def run_compare(state_dir: Path, args) -> List[str]:
    from rand_reference import compare
    from robust.data import create_dataset

    digits = create_dataset("digits")
    n = min(args.examples, len(digits.test))
    x, y, _ = digits.test.batch(torch.arange(n))
    lines = ["| model | examples | clean | ours apgd-rand [95% CI] | torchattacks APGD-EOT [95% CI] | "
             "ours - ref [95% CI] | at least as strong | ours s | ref s |",
             "|---|---:|---:|---:|---:|---:|:---:|---:|---:|"]
    for kind in ("pni", "per-example-noise"):
        model = load_model(kind, state_dir, digits)
        c = compare(model, x, y, digits.eps, seed=args.seed, votes=args.votes, steps=args.steps,
                    eot_samples=args.eot)
        (ol, oh), (rl, rh), (dl, dh) = c.ours.interval(), c.reference.interval(), c.difference_interval()
        lines.append(f"| {kind} | {n} | {c.clean:.3f} | {c.ours.accuracy:.3f} [{ol:.3f}, {oh:.3f}] | "
                     f"{c.reference.accuracy:.3f} [{rl:.3f}, {rh:.3f}] | "
                     f"{c.ours.accuracy - c.reference.accuracy:+.3f} [{dl:+.3f}, {dh:+.3f}] | "
                     f"{'yes' if c.ours_at_least_as_strong else 'NO'} | {c.ours.seconds:.1f} | "
                     f"{c.reference.seconds:.1f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


# ---------------------------------------------------------------- part 2: cost, one side

def child(args) -> None:
    """Time APGD-rand on one model kind with whichever ``robust`` is first on the path."""
    import inspect

    import robust
    from rand_reference import ours_rand
    from robust.data import create_dataset
    from robust.evaluation.protocol import evaluate_shard
    from robust.evaluation.suite import parse_attack

    torch.set_num_threads(args.threads)
    digits = create_dataset("digits")
    model = load_model(args.kind, Path(args.state_dir), digits)
    passes = {"calls": 0, "inputs": 0}

    def count(_module, inputs):
        passes["calls"] += 1
        passes["inputs"] += inputs[0].shape[0]

    model.register_forward_pre_hook(count)
    n = args.timing_examples
    x, y, _ = digits.test.batch(torch.arange(n))
    out: Dict[str, object] = {"robust": str(Path(robust.__file__).parent.parent)}
    ours_rand(model, x[:4], y[:4], digits.eps, args.seed, 2, 2)  # warm-up: allocator, kernels, probes
    passes.update(calls=0, inputs=0)
    start = time.perf_counter()
    ours_rand(model, x, y, digits.eps, args.seed, args.steps, args.eot)
    out["attacks_s"], out["attacks_passes"], out["attacks_inputs"] = (
        time.perf_counter() - start, passes["calls"], passes["inputs"])
    passes.update(calls=0, inputs=0)
    specs = [s.with_params(steps=args.steps, eot_samples=args.eot) for s in parse_attack("apgd-rand")]
    start = time.perf_counter()
    evaluate_shard(model, digits.test, range(n), specs, digits.eps, torch.device("cpu"), seed=args.seed,
                   batch_size=n, protocol="independent", large_eps_examples=0)
    out["evaluate_s"], out["evaluate_passes"], out["evaluate_inputs"] = (
        time.perf_counter() - start, passes["calls"], passes["inputs"])
    out["check_examples"] = inspect.signature(evaluate_shard).parameters.get("check_examples")
    out["check_examples"] = None if out["check_examples"] is None else out["check_examples"].default
    print(json.dumps(out))


def _side(tree: Path, kind: str, state_dir: Path, args) -> Dict[str, object]:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{TESTS}", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--kind", kind, "--state-dir",
           str(state_dir), "--timing-examples", str(args.timing_examples), "--steps", str(args.steps),
           "--eot", str(args.eot), "--seed", str(args.seed), "--threads", str(args.threads)]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tree} {kind} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["robust"]).resolve() != tree.resolve():
        raise RuntimeError(f"the {tree} side imported robust from {result['robust']}")
    return result


def run_cost(state_dir: Path, args) -> List[str]:
    before, after = Path(args.before), REPO_ROOT
    lines = ["| model | what | before s (median) | after s (median) | after / before | per-run ratios | "
             "passes before -> after | inputs before -> after |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for kind in KINDS:
        runs: Dict[str, List[Dict[str, object]]] = {"before": [], "after": []}
        for r in range(args.runs):
            order = [("before", before), ("after", after)]
            for name, tree in (order if r % 2 == 0 else order[::-1]):
                runs[name].append(_side(tree, kind, state_dir, args))
            print(f"  {kind} run {r + 1}/{args.runs}: "
                  f"attacks {runs['before'][-1]['attacks_s']:.1f} -> {runs['after'][-1]['attacks_s']:.1f} s, "
                  f"evaluate {runs['before'][-1]['evaluate_s']:.1f} -> {runs['after'][-1]['evaluate_s']:.1f} s "
                  f"({_load_avg()})", file=sys.stderr, flush=True)
        check = runs["after"][0]["check_examples"]
        for what, label in (("attacks", "APGD-CE + APGD-DLR"),
                            ("evaluate", f"evaluate_shard apgd-rand (R = 10; after: 2S check on {check})")):
            b = [float(v[f"{what}_s"]) for v in runs["before"]]
            a = [float(v[f"{what}_s"]) for v in runs["after"]]
            ratios = ", ".join(f"{x / y:.2f}" for x, y in zip(a, b))
            lines.append(f"| {kind} | {label} | {statistics.median(b):.2f} | {statistics.median(a):.2f} | "
                         f"{statistics.median(a) / statistics.median(b):.2f}x | {ratios} | "
                         f"{runs['before'][0][f'{what}_passes']} -> {runs['after'][0][f'{what}_passes']} | "
                         f"{runs['before'][0][f'{what}_inputs']} -> {runs['after'][0][f'{what}_inputs']} |")
    return lines


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "compare", "cost"), default="all")
    parser.add_argument("--examples", type=int, default=256, help="test examples of the comparison")
    parser.add_argument("--timing-examples", type=int, default=64, help="the batch of the cost part")
    parser.add_argument("--steps", type=int, default=100, help="APGD steps, both sides")
    parser.add_argument("--eot", type=int, default=20, help="EOT samples S, both sides")
    parser.add_argument("--votes", type=int, default=20, help="R, the verdict's draws of the comparison")
    parser.add_argument("--runs", type=int, default=3, help="alternating before/after repetitions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5, help="standard training epochs")
    parser.add_argument("--pni-epochs", type=int, default=5)
    parser.add_argument("--pni-steps", type=int, default=7, help="PGD steps of PNI's training loss")
    parser.add_argument("--before", default="/tmp/orig", help="checkout of the code before issue 14")
    parser.add_argument("--state-dir", help="trained weights (default: train into a temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.examples, args.timing_examples, args.steps, args.eot, args.votes, args.runs,
           args.threads) < 1:
        parser.error("--examples, --timing-examples, --steps, --eot, --votes, --runs and --threads "
                     "must be >= 1")
    if args.child:
        child(args)
        return 0
    sys.path[:0] = [str(REPO_ROOT), str(TESTS)]
    torch.set_num_threads(args.threads)
    if args.part in ("all", "compare"):
        try:
            import torchattacks
        except ImportError as exc:
            parser.error(f"torchattacks is not importable ({exc}); install the reference for this "
                         f"benchmark: .venv/bin/pip install --no-deps torchattacks==3.5.1")
        print(f"torchattacks {torchattacks.__version__}", file=sys.stderr)
    if args.part in ("all", "cost") and not (Path(args.before) / "robust").is_dir():
        parser.error(f"--before {args.before} is not a checkout of the project (no robust/ there); "
                     f"make one with: git worktree add {args.before} e98a8c2")
    print(f"torch {torch.__version__}, threads {args.threads}, nproc {os.cpu_count()}, steps {args.steps}, "
          f"S {args.eot}, R {args.votes}, {_load_avg()}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(args.state_dir or tmp)
        if not (state_dir / "pni.pt").exists():
            state_dir.mkdir(parents=True, exist_ok=True)
            train_models(state_dir, args.epochs, args.pni_epochs, args.pni_steps)
        if args.part in ("all", "compare"):
            print("\n".join(run_compare(state_dir, args)) + "\n", flush=True)
        if args.part in ("all", "cost"):
            print("\n".join(run_cost(state_dir, args)), flush=True)
    print(f"done, {_load_avg()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
