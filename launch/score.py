#!/usr/bin/env python
"""Score trained models with the R2 and R4 robustness scores (Tibo, Jaeger & Larsen), sharded over Ray actors.

    python launch/score.py results/<experiment> --scores r2,r4
    python launch/score.py <experiment> --storage s3://bucket/prefix --scores r2 --max-examples 500
    python launch/score.py results/<experiment> --scores r4 --sigma 0.06 --eps-samples 200

R2: per-example margins (FGSM, PGD and a minimal-distance attack moved to the
boundary by binary search, the closest kept); R4: 1/eps-weighted agreement
over autoencoder samples (the autoencoder is trained once per dataset on its
training split and stored under <experiment>/artifacts/).  Rows go into the
experiment's data/scores/ (one file per trial, score and shard; shards already
written are skipped), and the summary is printed at the end.  Everything is
validated before Ray starts; bad input exits 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional

from cluster.cli import OneLineParser, UsageError, parse_and_resolve


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="score.py", description="Score trained models with R2 and R4.")
    p.add_argument("experiment", help="experiment folder (or its name under --storage, or s3://bucket/prefix/<name>)")
    p.add_argument("--storage", help="results directory or s3://bucket/prefix holding the experiment")
    p.add_argument("--scores", default="r2,r4", help="comma-separated: r2, r4")
    p.add_argument("--trial", action="append", default=[], help="score only this trial (repeatable)")
    p.add_argument("--max-examples", type=int, help="score at most this many test examples")
    p.add_argument("--sigma", type=float, help="R4 code noise s (default 0.06, section 7)")
    p.add_argument("--samples", type=int, help="R4 autoencoder samples per example (default 100)")
    p.add_argument("--eps-samples", type=int, help="R4 |Sigma|, eps values sampled uniformly (default 200)")
    p.add_argument("--eps-max", type=float, help="R4 upper end of the eps sample (default sqrt(m))")
    p.add_argument("--ae-epochs", type=int, help="epochs of the R4 autoencoder (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seeds PGD starts, R4 samples and the autoencoder")
    p.add_argument("--actors", type=int, help="actors (default: one per CPU, 4 per GPU)")
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--endpoint", help="S3-compatible endpoint URL")
    p.add_argument("--address", help="Ray cluster address (default: a private local instance)")
    return p


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """Validate everything (scores, settings, trials) without Ray; raises UsageError."""
    from cluster.evaluation import completed_sources, select_trials
    from cluster.scores import ScoreSettings
    from cluster.storage import Storage
    from robust.scores import check_scores
    from robust.scores.autoencoder import AutoencoderConfig
    from robust.scores.r4 import R4Config

    for flag in ("max_examples", "actors", "shard_size", "batch_size", "samples", "eps_samples", "ae_epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    location = args.experiment.rstrip("/")
    if args.storage:
        location = f"{args.storage.rstrip('/')}/{location}"
    storage = Storage(location, args.endpoint)
    try:
        scores = check_scores(args.scores.split(","))
        r4 = {k: v for k, v in {"sigma": args.sigma, "samples": args.samples, "eps_samples": args.eps_samples,
                                "eps_max": args.eps_max}.items() if v is not None}
        ae = {"epochs": args.ae_epochs} if args.ae_epochs is not None else {}
        settings = ScoreSettings(scores=tuple(scores), batch_size=args.batch_size, shard_size=args.shard_size,
                                 max_examples=args.max_examples, seed=args.seed, r4=R4Config(**r4),
                                 autoencoder=AutoencoderConfig(**ae))
    except ValueError as err:
        raise UsageError(str(err)) from None
    root = storage.root
    try:
        sources = select_trials(completed_sources(storage, location), args.trial, location)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return {"storage": storage, "root": root, "sources": sources, "settings": settings, "location": location}


def main(argv: Optional[List[str]] = None) -> int:
    args, r = parse_and_resolve(build_parser(), resolve, argv)

    from cluster.experiment import init_ray
    from cluster.scores import run_scoring

    init_ray(args.address)
    done = run_scoring(r["sources"], r["settings"], r["storage"], r["root"], actors=args.actors)
    print(f"scored {done} example(s) x score(s) x model(s); results in {r['storage'].display(r['root'])}")
    import summarize

    summarize.show(r["location"], args.endpoint)  # the tables so far; scoring itself succeeded
    return 0


if __name__ == "__main__":
    sys.exit(main())
