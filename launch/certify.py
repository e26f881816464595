#!/usr/bin/env python
"""Certify trained models under additive noise (STN Algorithm 1; Cohen et al.'s radius too).

    python launch/certify.py results/<experiment> --preset cohen --sigma 0.25 --skip 20 --max 500
    python launch/certify.py results/<experiment> --preset stn --split 4       # one image's samples on 4 actors
    python launch/certify.py results/<experiment> --radius 0.3 --early-stop    # stop sampling once decided
    python launch/certify.py results/<experiment> --radius 0.4 --early-stop --bound cohen

Images are spread over a pool of Ray actors; one Parquet file per (trial,
sigma, shard of images) under data/certify/; shards already written are
skipped.  Presets: stn (95% confidence, n0 = n = 100) and cohen (n0 = 100,
n = 100,000, confidence 0.999).  sigma defaults to the trial's training sigma
(stn) and is required otherwise.  Everything is validated before Ray starts.

Early stopping looks at the counts after every ceil(n / 10) estimation samples
(10 looks, each at level alpha / 10; the looks follow n, not the throughput
chunk) and decides the certificate at --radius by --bound (default: renyi for
Gaussian noise, laplace for Laplace).  A radius that bound cannot certify at
this sigma, n and confidence even with every sample on the top class is refused,
naming the largest reachable radius (stn preset, sigma 0.25: 0.317 for renyi,
0.407 for cohen).  The smoothed classifier is the trained network under the
certification noise; rows also carry Cohen et al.'s PREDICT on the estimation
samples (abstain counted as wrong; not with early stopping).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Dict, List, Optional

from cluster.cli import OneLineParser, UsageError, parse_and_resolve


def build_parser():
    p = OneLineParser(prog="certify.py", description="Certify trained models under additive noise.")
    p.add_argument("experiment", help="experiment folder or s3://bucket/prefix/<experiment>")
    p.add_argument("--preset", default="stn", help="stn (default) or cohen")
    p.add_argument("--sigma", type=float, help="noise scale (default: the trial's training sigma)")
    p.add_argument("--noise", help="gaussian or laplace (default: the trial's training noise)")
    p.add_argument("--n", type=int, help="estimation samples per image")
    p.add_argument("--n0", type=int, help="selection samples per image")
    p.add_argument("--confidence", type=float, help="1 - alpha, in (0, 1)")
    p.add_argument("--skip", type=int, default=1, help="certify every SKIP-th test example")
    p.add_argument("--max", type=int, dest="max_examples", help="at most this many examples")
    p.add_argument("--split", type=int, default=1, help="split one image's samples over this many jobs")
    p.add_argument("--radius", type=float, help="requested radius for --early-stop")
    p.add_argument("--early-stop", action="store_true", help="stop sampling an image once decided")
    p.add_argument("--bound", help="the bound --early-stop decides by (default: renyi for gaussian noise, "
                   "laplace for laplace)")
    p.add_argument("--chunk", type=int, help="noisy copies per forward pass (default: by input size on CPU, "
                   "64 for 3x32x32 to 400 for 8x8; 1000 on GPU)")
    p.add_argument("--trial", action="append", default=[], help="certify only this trial (repeatable)")
    p.add_argument("--actors", type=int, help="actors (default: one per CPU, 4 per GPU)")
    p.add_argument("--endpoint", help="S3-compatible endpoint URL")
    p.add_argument("--address", help="Ray cluster address (default: a private local instance)")
    return p


def resolve(args) -> Dict[str, Any]:
    from cluster.certification import CertifySettings
    from cluster.evaluation import completed_sources, select_trials
    from cluster.storage import Storage
    from robust.certify import CERTIFY_PRESETS
    import torch

    from robust.certify.smooth import (BOUNDS, check_confidence, check_noise, check_reachable, check_sample_sizes,
                                       default_chunk, look_batch)
    from robust.data import DATASETS

    if args.preset not in CERTIFY_PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; valid choices: {', '.join(CERTIFY_PRESETS)}")
    for flag in ("skip", "max_examples", "split", "chunk", "actors"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_examples', '').replace('_', '-')} must be >= 1, got {value}")
    if args.early_stop and args.radius is None:
        raise UsageError("--early-stop needs --radius (the radius whose certificate is decided)")
    if args.bound is not None and not args.early_stop:
        raise UsageError("--bound chooses the bound --early-stop decides by: add --early-stop --radius R")
    if args.radius is not None and not (math.isfinite(args.radius) and args.radius >= 0):
        raise UsageError(f"--radius must be a finite number >= 0, got {args.radius}")
    preset = {**CERTIFY_PRESETS[args.preset]}
    for key in ("n", "n0", "confidence"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    storage = Storage(args.experiment.rstrip("/"), args.endpoint)
    try:
        trials = select_trials(completed_sources(storage, args.experiment), args.trial, args.experiment)
    except ValueError as err:
        raise UsageError(str(err)) from None
    groups: Dict[tuple, list] = {}
    for t in trials:
        spec = t.spec
        trained = spec.get("defense_config", {})
        sigma = args.sigma if args.sigma is not None else trained.get("sigma")
        noise = args.noise or trained.get("noise", "gaussian")
        if sigma is None:
            raise UsageError(f"trial {t.trial} ({spec['defense']}) has no training sigma: give --sigma")
        ds = DATASETS.get(spec["dataset"])
        chunk = args.chunk or default_chunk(torch.device("cpu"), ds.in_channels * ds.image_size ** 2)
        groups.setdefault((float(sigma), noise, chunk), []).append(t)
    try:
        plans = []
        for (sigma, noise, chunk), sources in groups.items():
            check_noise(noise, sigma)
            check_confidence(preset["confidence"])
            check_sample_sizes(preset["n0"], preset["n"])
            if args.early_stop:
                bound = args.bound or BOUNDS[noise][0]
                if bound not in BOUNDS[noise]:
                    raise UsageError(f"unknown bound {bound!r} for {noise} noise; valid choices: "
                                     f"{', '.join(BOUNDS[noise])}")
                check_reachable(args.radius, preset["n"], preset["confidence"], sigma, noise, bound,
                                math.ceil(preset["n"] / look_batch(preset["n"])))
            plans.append((CertifySettings(sigma=sigma, noise=noise, n0=preset["n0"], n=preset["n"],
                                          confidence=preset["confidence"], chunk=chunk,
                                          skip=args.skip, max_examples=args.max_examples, split=args.split,
                                          radius=args.radius, early_stop=args.early_stop, bound=args.bound),
                          sources))
    except ValueError as err:
        raise UsageError(str(err)) from None
    return {"storage": storage, "plans": plans}


def main(argv: Optional[List[str]] = None) -> int:
    args, r = parse_and_resolve(build_parser(), resolve, argv)

    import dataclasses

    import ray  # cluster_resources after init_ray

    from cluster.certification import run_certification
    from cluster.experiment import evaluation_actors, init_ray

    init_ray(args.address)
    actors, gpus = evaluation_actors(ray.cluster_resources())
    storage = r["storage"]
    for settings, sources in r["plans"]:
        if gpus and args.chunk is None:
            settings = dataclasses.replace(settings, chunk=1000)
        done = run_certification(sources, settings, storage, storage.root, args.actors or actors, gpus)
        print(f"certified {done} image(s) x model(s) at sigma {settings.sigma} ({settings.noise})")
    import summarize

    return summarize.show(args.experiment, args.endpoint)


if __name__ == "__main__":
    sys.exit(main())
