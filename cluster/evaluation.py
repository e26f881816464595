"""Evaluation of trained trials on the test split, sharded into Ray tasks.

Each task evaluates one fixed shard of test positions of one trial clean and
under every attack, and writes one Parquet file per (attack, shard) with a
deterministic name, so a retried task overwrites its own files.  Shards whose
files all exist are skipped, so a resumed experiment evaluates only what is
missing.  The driver shows a progress bar over examples.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import pyarrow as pa
import ray
import torch

from cluster.records import load_state
from cluster.storage import Storage
from robust.device import prepare_module
from robust.evaluate import CLEAN, AttackSpec, evaluate_shard, shard_positions
from robust.results.schema import ATTACK_SCHEMA, attack_path, file_metadata, write_table
from robust.spec import TrialSpec, build_model, build_defense, load_splits


@dataclass(frozen=True)
class ShardJob:
    trial: str
    spec: Dict[str, Any]
    checkpoint: str
    shard: int
    start: int
    stop: int


def _labels(spec: TrialSpec) -> List[str]:
    return [CLEAN] + [AttackSpec.parse(a).label for a in spec.attacks]


def evaluate_job(job: ShardJob, storage: Storage, root: str, batch_size: int) -> int:
    """Evaluate one shard and write its files; returns the number of examples."""
    spec = TrialSpec.from_dict(job.spec)
    splits = load_splits(spec)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    module = build_defense(spec, splits).prepare_model(build_model(spec, splits))
    module.load_state_dict(load_state(storage, job.checkpoint)["model"])
    module = prepare_module(module, device)
    columns = evaluate_shard(module, splits.test, range(job.start, job.stop),
                             [AttackSpec.parse(a) for a in spec.attacks], splits.eps, device,
                             seed=spec.seed, shard=job.shard, batch_size=batch_size)
    fs = storage.filesystem
    for label, cols in columns.items():
        n = len(cols["example"])
        table = pa.table({**cols, "config_id": [spec.config_id()] * n, "seed": [spec.seed] * n,
                          "shard": [job.shard] * n}, schema=ATTACK_SCHEMA)
        write_table(fs, attack_path(root, spec.defense, job.trial, label, job.shard), table,
                    file_metadata(spec.to_dict()))
    return job.stop - job.start


def plan_jobs(trials: Sequence[Dict[str, Any]], storage: Storage, root: str, test_size: int,
              shard_size: int) -> List[ShardJob]:
    """Shard jobs of completed trials whose result files are not all there yet."""
    fs = storage.filesystem
    jobs = []
    for row in trials:
        spec = TrialSpec.from_dict(json.loads(row["config"]))
        n = min(test_size, spec.max_test_examples or test_size)
        for shard, positions in enumerate(shard_positions(n, shard_size)):
            paths = [attack_path(root, spec.defense, row["trial"], label, shard) for label in _labels(spec)]
            infos = fs.get_file_info(paths)
            if all(i.type == i.type.File for i in infos):
                continue
            jobs.append(ShardJob(row["trial"], spec.to_dict(), row["checkpoint"], shard,
                                 positions.start, positions.stop))
    return jobs


def run_jobs(jobs: Sequence[ShardJob], storage: Storage, root: str, *, num_cpus: float,
             num_gpus: float, batch_size: int, max_retries: int = 3) -> int:
    """Run shard jobs as Ray tasks with a progress bar; returns examples evaluated."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    task = ray.remote(evaluate_job).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                            max_retries=max_retries)
    pending = {task.remote(job, storage, root, batch_size): job for job in jobs}
    total = sum(j.stop - j.start for j in jobs)
    done = 0
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as progress:
        bar = progress.add_task("evaluating (clean, attacks) on test examples", total=total)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                n = ray.get(ref)
                done += n
                progress.update(bar, advance=n)
    return done
