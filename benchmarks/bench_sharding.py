#!/usr/bin/env python
"""Speed-up of sharded evaluation: 2 Ray actors vs 1 actor vs one process using both cores.

    .venv/bin/python benchmarks/bench_sharding.py [--runs 3] [--attack pgd-20] [--model small-cnn]

The same trained-shape model (random weights: speed does not depend on
training) is evaluated on the whole digits test split (360 examples) clean
and under the attack, in shards of 32 examples.  Each configuration is timed
end to end (actor start and model loading included: that is what a user
waits for) and the median of --runs is reported.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--attack", default="pgd-20")
    p.add_argument("--model", default="small-cnn")
    args = p.parse_args()

    import ray

    from cluster.evaluation import EvalSettings, ModelSource, plan_jobs, run_pool
    from cluster.records import STATE_FILE
    from cluster.storage import Storage
    from robust.evaluation.protocol import evaluate_shard
    from robust.evaluation.suite import parse_attacks
    from robust.spec import TrialSpec, build_model, load_splits

    spec = TrialSpec(defense="standard", dataset="digits", model=args.model, seed=0)
    splits = load_splits(spec)
    model = build_model(spec, splits).eval()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "ckpt").mkdir()
    torch.save({"model": model.state_dict()}, tmp / "ckpt" / STATE_FILE)
    source = ModelSource("t0", spec.to_dict(), checkpoint=str(tmp / "ckpt"))
    settings = EvalSettings(attacks=(args.attack,), batch_size=32, shard_size=32, large_eps_examples=0)
    n = len(splits.test)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    timings = {"1 actor": [], "2 actors": [], "1 process, 2 threads": []}
    for run in range(args.runs):
        for actors in (1, 2):
            storage = Storage(str(tmp / f"r{run}a{actors}"))
            root = storage.experiment("exp")
            jobs = plan_jobs([source], settings, storage, root, {"t0": n}, {"t0": splits.eps})
            started = time.perf_counter()
            run_pool(jobs, [source], settings, storage, root, actors=actors)
            timings[f"{actors} actor{'s' if actors > 1 else ''}"].append(time.perf_counter() - started)
        torch.set_num_threads(2)
        started = time.perf_counter()
        evaluate_shard(model, splits.test, range(n), parse_attacks([args.attack], splits.eps), splits.eps,
                       torch.device("cpu"), seed=0, batch_size=32, large_eps_examples=0)
        timings["1 process, 2 threads"].append(time.perf_counter() - started)
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in timings.items()}
    print(f"| configuration | median seconds ({args.runs} runs) | speed-up over 1 actor |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {med['1 actor'] / v:.2f}x |")
    print(f"\n2 actors vs one process with both cores: {med['1 process, 2 threads'] / med['2 actors']:.2f}x")


if __name__ == "__main__":
    main()
