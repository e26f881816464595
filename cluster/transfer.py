"""Transfer-attack evaluation sharded over Ray actors.

A plan maps each source model to the target models that classify its
adversarial examples: ``seed_matrix`` (every model of a configuration
attacked with the examples of the configuration's other seeds, constant
perturbations A.1; the diagonal stays empty) or ``from_source`` (one named
source against every target, constant perturbations Table 10, Learn2Perturb
Table 6).  A job is one (source, shard): the actor crafts the shard's
examples on the source once (:func:`robust.evaluation.transfer.craft_batches`)
and classifies them with every target of that source, writing one file per
(source, target, attack, shard) into ``data/transfer``.  Models are loaded
once per actor; shards already written are skipped; retried jobs overwrite
their own files (the pool of :mod:`cluster.pool`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
from torch import nn

from cluster.evaluation import EvalSettings, ModelSource, ShardJob, cpu_slots, load_model
from cluster.records import node_name
from cluster.storage import Storage
from robust.data.base import DatasetSplits
from robust.device import default_device, prepare_module
from robust.evaluation.protocol import shard_positions
from robust.evaluation.suite import parse_attacks
from robust.evaluation.transfer import classify_on_target, craft_batches
from robust.results.schema import TRANSFER_SCHEMA, file_metadata, transfer_path, write_table
from robust.spec import TrialSpec, load_splits

#: source trial -> the target trials that classify its examples
TransferPlan = Dict[str, List[str]]


def seed_matrix(models: Sequence[ModelSource]) -> TransferPlan:
    """Within each configuration (config id), every model is a source for every other one."""
    groups: Dict[str, List[str]] = defaultdict(list)
    for m in models:
        groups[TrialSpec.from_dict(m.spec).config_id()].append(m.trial)
    plan = {s: [t for t in group if t != s] for group in groups.values() for s in group}
    if not any(plan.values()):
        raise ValueError("--transfer seeds needs a configuration with at least 2 seeds; every configuration "
                         "here has one (train with --seeds 2 or more)")
    return plan


def from_source(source: ModelSource, targets: Sequence[ModelSource]) -> TransferPlan:
    """One source against every target except itself."""
    plan = {source.trial: [t.trial for t in targets if t.trial != source.trial]}
    if not plan[source.trial]:
        raise ValueError(f"no target model besides the source {source.trial}")
    return plan


def check_datasets(plan: TransferPlan, models: Dict[str, ModelSource]) -> None:
    """Examples crafted on one test split can only be classified by models of the same dataset."""
    for source, targets in plan.items():
        for target in targets:
            a, b = (TrialSpec.from_dict(models[m].spec) for m in (source, target))
            if (a.dataset, a.dataset_config) != (b.dataset, b.dataset_config):
                raise ValueError(f"source {source} ({a.dataset}) and target {target} ({b.dataset}) "
                                 "use different datasets")


def plan_transfer_jobs(plan: TransferPlan, models: Dict[str, ModelSource], settings: EvalSettings,
                       storage: Storage, root: str) -> List[ShardJob]:
    """The (source, shard) jobs for which some (target, attack) file is missing."""
    jobs = []
    for source, targets in plan.items():
        if not targets:
            continue
        splits = load_splits(TrialSpec.from_dict(models[source].spec))
        labels = [a.label for a in parse_attacks(list(settings.attacks), splits.eps)]
        n = min(len(splits.test), settings.max_examples or len(splits.test))
        for shard, positions in enumerate(shard_positions(n, settings.shard_size)):
            paths = [transfer_path(root, source, t, label, shard) for t in targets for label in labels]
            if all(info.is_file for info in storage.filesystem.get_file_info(paths)):
                continue
            jobs.append(ShardJob(source, shard, positions.start, positions.stop))
    return jobs


class TransferWorker:
    """A Ray actor's state: the models it has loaded, by trial, and the plan."""

    def __init__(self, storage: Storage, root: str, settings: EvalSettings, plan: TransferPlan,
                 models: Dict[str, ModelSource]) -> None:
        self.storage, self.root, self.settings, self.plan, self.models = storage, root, settings, plan, models
        self.loaded: Dict[str, Tuple[nn.Module, DatasetSplits]] = {}

    def model(self, trial: str) -> Tuple[nn.Module, DatasetSplits]:
        if trial not in self.loaded:
            splits = load_splits(TrialSpec.from_dict(self.models[trial].spec))
            model = prepare_module(load_model(self.models[trial], self.storage, splits), default_device())
            self.loaded[trial] = (model, splits)
        return self.loaded[trial]

    def run(self, job: ShardJob) -> int:
        """Craft the shard on the source once, classify it with every target, write the rows."""
        source_spec = TrialSpec.from_dict(self.models[job.trial].spec)
        source, splits = self.model(job.trial)
        attacks = parse_attacks(list(self.settings.attacks), splits.eps)
        batches = craft_batches(source, splits.test, range(job.start, job.stop), attacks, splits.eps,
                                default_device(), seed=source_spec.seed, batch_size=self.settings.batch_size)
        for target_trial in self.plan[job.trial]:
            target, _ = self.model(target_trial)
            spec = TrialSpec.from_dict(self.models[target_trial].spec)
            columns = classify_on_target(target, batches, seed=spec.seed, votes=self.settings.votes)
            for label, cols in columns.items():
                n = len(cols["example"])
                table = pa.table({**cols, "config_id": [spec.config_id()] * n, "seed": [spec.seed] * n,
                                  "source_seed": [source_spec.seed] * n, "shard": [job.shard] * n,
                                  "node": [node_name()] * n}, schema=TRANSFER_SCHEMA)
                write_table(self.storage.filesystem,
                            transfer_path(self.root, job.trial, target_trial, label, job.shard), table,
                            file_metadata({"source": source_spec.to_dict(), "target": spec.to_dict(),
                                           "evaluation": self.settings.__dict__}))
        return job.stop - job.start


def run_transfer(plan: TransferPlan, models: Sequence[ModelSource], settings: EvalSettings, storage: Storage,
                 root: str, actors: Optional[int] = None, gpus_per_actor: float = 0.0) -> int:
    """Run every missing (source, shard) job on the actor pool; returns source examples crafted."""
    import ray
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from cluster.pool import run_jobs

    by_trial = {m.trial: m for m in models}
    check_datasets(plan, by_trial)
    jobs = plan_transfer_jobs(plan, by_trial, settings, storage, root)
    if not jobs:
        return 0
    Worker = ray.remote(TransferWorker).options(num_cpus=1, num_gpus=gpus_per_actor, max_restarts=0,
                                                max_task_retries=0)
    total, done = sum(j.stop - j.start for j in jobs), 0
    n_targets = sum(len(t) for t in plan.values())
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as progress:
        bar = progress.add_task(f"transfer: {len(plan)} source(s) -> {n_targets} (source, target) pair(s)",
                                total=total)
        for _, n in run_jobs(lambda: Worker.remote(storage, root, settings, plan, by_trial), jobs,
                             lambda a, job: a.run.remote(job), min(actors or cpu_slots(), cpu_slots()),
                             storage, root, describe=lambda j: f"transfer source={j.trial} shard={j.shard}"):
            done += n
            progress.update(bar, advance=n)
    return done
