#!/usr/bin/env python
"""Certification benchmarks (CPU): sampling throughput, early-stopping savings, sharding.

    .venv/bin/python benchmarks/bench_certify.py [--threads 2] [--runs 5] [--quick] [--parts 1 2 3]

Prints Markdown tables.  Three parts, measured in one run:

1. Throughput (noisy forward passes per second) of ``Smooth.sample_counts``
   against a re-implementation, written here, of the sampling loop of Cohen et
   al.'s certify (the input repeated ``batch`` = 400 times per forward,
   ``torch.randn_like`` noise, argmax, bincount), same model, same n, float32,
   under ``torch.no_grad()``.  Median of --runs repetitions, ours and the
   reference interleaved within each repetition (order alternating), after
   one warm-up each (on n / 5).  Models: small-cnn on 3x32x32 and on 1x8x8 (digits
   shape), random weights seeded, eval mode.
2. Samples saved by sequential early stopping: small-cnn trained 3 epochs
   with STN (sigma 0.25) on digits, certified on test images once without
   early stopping and once per radius r with ``early_stop=True, radius=r``
   (renyi decides); certified accuracy at r and mean samples per image.
3. Sharded certification: ``run_certification`` with 2 Ray actors vs 1 actor
   vs one process using both cores (``Smooth.certify`` in a loop), end to end
   (actor start and model loading included), fresh storage per run.

Speed does not depend on training for parts 1 and 3; part 3 uses the part-2
model anyway when it was trained in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robust.certify import Smooth  # noqa: E402
from robust.certify.smooth import certified_accuracy  # noqa: E402
from robust.models import create_model  # noqa: E402

REFERENCE_BATCH = 400
SIGMA = 0.25


# --------------------------------------------------------------------------- reference
def reference_counts(model: nn.Module, x: torch.Tensor, num: int, num_classes: int, sigma: float,
                     batch_size: int = REFERENCE_BATCH) -> np.ndarray:
    """Cohen et al.'s certify sampling loop (re-implemented from its description).

    x: one input [C x H x W]; repeat it ``this_batch`` times per forward pass,
    add N(0, sigma^2) noise from ``randn_like``, take the argmax and bincount,
    until ``num`` samples; float32, no_grad, the model already in eval mode.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    remaining = num
    with torch.no_grad():
        while remaining > 0:
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = x.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
    return counts


# --------------------------------------------------------------------------- helpers
def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _median(values: List[float]) -> float:
    return statistics.median(values)


# --------------------------------------------------------------------------- part 1
def part_throughput(args) -> None:
    n = args.n_throughput
    configs = [("small-cnn 3x32x32", 3, 32), ("small-cnn 1x8x8 (digits)", 1, 8)]
    print(f"## 1. Sampling throughput (noisy forward passes / s), n = {n:,}, sigma = {SIGMA}, "
          f"float32, {args.threads} threads, median of {args.runs}\n")
    print("| model / input | ours (default chunk) | ours (chunk 400) | reference (Cohen loop, batch 400) "
          "| ours / reference | ours chunk 400 / reference | target >= 1.1x |")
    print("|---|---|---|---|---|---|---|")
    for label, channels, size in configs:
        torch.manual_seed(0)
        model = create_model("small-cnn", num_classes=10, in_channels=channels, image_size=size).eval()
        x = torch.rand(channels, size, size, generator=torch.Generator().manual_seed(1))
        ours = Smooth(model, 10, SIGMA, input_shape=tuple(x.shape))  # default chunk for this input size
        ours400 = Smooth(model, 10, SIGMA, chunk=400)
        runners = {
            "ours": lambda: ours.sample_counts(x, n, image_id=0),
            "ours400": lambda: ours400.sample_counts(x, n, image_id=0),
            "reference": lambda: reference_counts(model, x, n, 10, SIGMA),
        }
        warm = max(n // 5, 400)  # warm-up, on a fifth of n
        ours.sample_counts(x, warm, image_id=1)
        ours400.sample_counts(x, warm, image_id=1)
        reference_counts(model, x, warm, 10, SIGMA)
        times: Dict[str, List[float]] = {k: [] for k in runners}
        order = list(runners)
        for rep in range(args.runs):
            for k in (order if rep % 2 == 0 else order[::-1]):
                times[k].append(_timed(runners[k]))
        rate = {k: n / _median(v) for k, v in times.items()}
        ratio = rate["ours"] / rate["reference"]
        print(f"| {label} | {rate['ours']:,.0f} (chunk {ours.chunk}) | {rate['ours400']:,.0f} | {rate['reference']:,.0f} "
              f"| {ratio:.2f}x | {rate['ours400'] / rate['reference']:.2f}x | "
              f"{'pass' if ratio >= 1.1 else 'FAIL'} |")
    print()


# --------------------------------------------------------------------------- part 2
def train_digits_model(epochs: int):
    from robust.data import create_dataset
    from robust.defenses import create_defense
    from robust.train import TrainConfig, fit

    digits = create_dataset("digits")
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8,
                         mean=digits.mean, std=digits.std)
    cfg = TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0,
                      schedule="cosine", val_attack_steps=5, val_attack_every=epochs)  # validation once, at the end
    started = time.perf_counter()
    module, _ = fit(model, create_defense("stn", eps_data=digits.eps, sigma=SIGMA), digits, cfg, seed=0,
                    device=torch.device("cpu"))
    return module.eval(), digits, time.perf_counter() - started


def part_early_stop(args, model, digits, train_seconds) -> None:
    radii = args.radii
    test = digits.test
    skip = max(1, len(test) // args.images)
    positions = list(range(0, len(test), skip))[: args.images]
    n0, n, conf = 100, args.n_early, 0.999
    smooth = Smooth(model, 10, SIGMA, chunk=args.early_chunk, seed=0)  # default early-stop batch
    batch = smooth.chunk * math.ceil(math.ceil(n / 10) / smooth.chunk)
    looks = math.ceil(n / batch)
    items = [test[p] for p in positions]
    labels = [int(y) for _, y, _ in items]
    with torch.no_grad():
        clean = model(torch.stack([x for x, _, _ in items])).argmax(1).numpy()
    clean_acc = float(np.mean(clean == np.array(labels)))

    started = time.perf_counter()
    full = [smooth.certify(x, n0, n, conf, image_id=int(i)) for x, _, i in items]
    full_seconds = time.perf_counter() - started
    full_samples = float(np.mean([c.samples_used for c in full]))

    print(f"## 2. Sequential early stopping on digits (STN small-cnn, sigma {SIGMA}, trained "
          f"{args.epochs} epochs in {train_seconds:.0f} s; clean accuracy on these images {clean_acc:.3f})\n")
    print(f"{len(items)} test images (every {skip}th), n0 = {n0}, n = {n:,}, confidence = {conf} "
          f"(alpha = {1 - conf:.3g}); early stopping looks every {batch} samples, K = {looks} looks at "
          f"alpha / {looks} each; chunk = {smooth.chunk}.  Without early stopping: "
          f"{full_samples:,.0f} samples / image, {full_seconds:.1f} s total.\n")
    print("| radius r | cert. acc. no ES (renyi) | cert. acc. no ES (cohen) | cert. acc. ES (renyi) "
          "| ES - no ES (renyi) | images decided differently | mean samples / image no ES "
          "| mean samples / image ES | saving factor | ES seconds | target >= 3x at equal acc. |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in radii:
        started = time.perf_counter()
        es = [smooth.certify(x, n0, n, conf, image_id=int(i), radius=r, early_stop=True) for x, _, i in items]
        es_seconds = time.perf_counter() - started
        acc_renyi = certified_accuracy(full, labels, [r], "renyi")[0]
        acc_cohen = certified_accuracy(full, labels, [r], "cohen")[0]
        acc_es = certified_accuracy(es, labels, [r], "renyi")[0]
        differ = sum((a.certified_at(r, "renyi") and a.prediction == y)
                     != (b.certified_at(r, "renyi") and b.prediction == y)
                     for a, b, y in zip(full, es, labels))
        es_samples = float(np.mean([c.samples_used for c in es]))
        saving = full_samples / es_samples
        verdict = "pass" if saving >= 3 and acc_es == acc_renyi else (
            "pass (near-equal)" if saving >= 3 else "FAIL")
        print(f"| {r} | {acc_renyi:.3f} | {acc_cohen:.3f} | {acc_es:.3f} | {acc_es - acc_renyi:+.3f} "
              f"| {differ} | {full_samples:,.0f} | {es_samples:,.0f} | {saving:.2f}x | {es_seconds:.1f} "
              f"| {verdict} |")
    print()


# --------------------------------------------------------------------------- part 3
def part_sharding(args, model, digits) -> None:
    import ray

    from cluster.certification import CertifySettings, run_certification
    from cluster.evaluation import ModelSource
    from cluster.records import STATE_FILE
    from cluster.storage import Storage
    from robust.spec import TrialSpec

    spec = TrialSpec(defense="stn", dataset="digits", model="small-cnn", seed=0,
                     defense_config={"sigma": SIGMA})
    tmp = Path(tempfile.mkdtemp(prefix="bench_certify_"))
    (tmp / "ckpt").mkdir()
    torch.save({"model": model.state_dict()}, tmp / "ckpt" / STATE_FILE)
    source = ModelSource("t0", spec.to_dict(), checkpoint=str(tmp / "ckpt"))
    settings = CertifySettings(sigma=SIGMA, n0=100, n=args.n_shard, confidence=0.999, chunk=64,
                               max_examples=args.shard_images)
    positions = settings.positions(len(digits.test))

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    timings: Dict[str, List[float]] = {"1 actor": [], "2 actors": [], "1 process, 2 threads": []}
    for run in range(args.shard_runs):
        for actors in ((1, 2) if run % 2 == 0 else (2, 1)):
            storage = Storage(str(tmp / f"r{run}a{actors}"))
            root = storage.experiment("exp")
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the progress bar
                done = run_certification([source], settings, storage, root, actors=actors)
            timings[f"{actors} actor{'s' if actors > 1 else ''}"].append(time.perf_counter() - started)
            assert done == len(positions), (done, len(positions))
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        smooth = Smooth(model, 10, SIGMA, chunk=settings.chunk, seed=spec.seed)
        started = time.perf_counter()
        for p in positions:
            x, _, index = digits.test[p]
            smooth.certify(x, settings.n0, settings.n, settings.confidence, image_id=int(index))
        timings["1 process, 2 threads"].append(time.perf_counter() - started)
        torch.set_num_threads(threads)
    ray.shutdown()

    med = {k: _median(v) for k, v in timings.items()}
    print(f"## 3. Sharded certification: {len(positions)} digits test images, n0 = {settings.n0}, "
          f"n = {settings.n:,}, chunk = {settings.chunk}, end to end (actor start + model load included), "
          f"median of {args.shard_runs}\n")
    print("| configuration | median seconds | all runs | speed-up over 1 actor |")
    print("|---|---|---|---|")
    for k, v in med.items():
        runs = ", ".join(f"{t:.2f}" for t in timings[k])
        print(f"| {k} | {v:.2f} | {runs} | {med['1 actor'] / v:.2f}x |")
    print(f"\n2 actors vs one process with both cores: {med['1 process, 2 threads'] / med['2 actors']:.2f}x\n")


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--runs", type=int, default=None, help="repetitions per timing (default 5; quick 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: small n, few images, 1 epoch")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--n-throughput", type=int, default=None, help="part 1 n (default 10,000; quick 2,000)")
    p.add_argument("--epochs", type=int, default=None, help="part 2 training epochs (default 3; quick 1)")
    p.add_argument("--images", type=int, default=None, help="part 2 test images (default 60; quick 10)")
    p.add_argument("--n-early", type=int, default=None, help="part 2 n (default 10,000; quick 2,000)")
    p.add_argument("--early-chunk", type=int, default=None,
                   help="part 2 Smooth chunk (default: Smooth's default, 64 on CPU)")
    p.add_argument("--shard-images", type=int, default=None, help="part 3 images (default 20; quick 6)")
    p.add_argument("--n-shard", type=int, default=None, help="part 3 n (default 2,000; quick 500)")
    p.add_argument("--shard-runs", type=int, default=None, help="part 3 repetitions (default --runs)")
    args = p.parse_args()
    q = args.quick
    args.runs = args.runs or (2 if q else 5)
    args.n_throughput = args.n_throughput or (2_000 if q else 10_000)
    args.epochs = args.epochs or (1 if q else 3)
    args.images = args.images or (10 if q else 60)
    args.n_early = args.n_early or (2_000 if q else 10_000)
    args.radii = [0.25, 0.5] if q else [0.25, 0.5, 0.75, 1.0]
    args.shard_images = args.shard_images or (6 if q else 20)
    args.n_shard = args.n_shard or (500 if q else 2_000)
    args.shard_runs = args.shard_runs or args.runs

    torch.set_num_threads(args.threads)
    print(f"<!-- command: {' '.join([os.path.basename(sys.executable)] + sys.argv)} -->")
    print(f"Machine: {platform.processor() or platform.machine()}, nproc = {os.cpu_count()}, "
          f"torch {torch.__version__}, torch threads = {torch.get_num_threads()}, "
          f"load average at start = {', '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    total = time.perf_counter()
    if 1 in args.parts:
        part_throughput(args)
    model = digits = None
    if 2 in args.parts or 3 in args.parts:
        model, digits, train_seconds = train_digits_model(args.epochs)
    if 2 in args.parts:
        part_early_stop(args, model, digits, train_seconds)
    if 3 in args.parts:
        part_sharding(args, model, digits)
    print(f"Total benchmark time: {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
