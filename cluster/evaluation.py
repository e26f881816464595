"""Evaluation sharded over a pool of Ray actors.

Test examples are split into fixed shards; each job is one (model, shard).
An actor loads each model once and keeps it (fractional GPUs when GPUs are
present).  Every job writes one Parquet file per (trial, attack, shard) with a
deterministic name, so a retried job overwrites its own files, and jobs whose
files all exist are skipped on a re-run.  After the jobs, the sanity flags of
every evaluated model are computed from its rows and stored beside them.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from cluster.records import load_state, node_name
from cluster.storage import Storage
from robust.data.base import DatasetSplits
from robust.defenses.base import BASE, DEPLOYED, classifier_name
from robust.device import default_device, prepare_module
from robust.evaluation import checks
from robust.evaluation.protocol import CLEAN, LARGE_EPS_LABEL, evaluate_shard, shard_positions
from robust.evaluation.suite import parse_attacks, spec_of_label
from robust.results.paired import TrialScores, eot_convergence
from robust.results.summary import SANITY_PREFIX
from robust.results.schema import (ATTACK_SCHEMA, CHECK_SCHEMA, attack_path, checks_path,
                                   file_metadata, read_kind, write_table)
from robust.spec import TrialSpec, build_defense, build_model, load_splits


@dataclass(frozen=True)
class ModelSource:
    """Where one evaluated model comes from: a trial checkpoint, or a factory + weights file."""

    trial: str
    spec: Dict[str, Any]
    checkpoint: str = ""      # a checkpoint directory in the experiment's storage
    factory: str = ""         # module:function returning an nn.Module (external model)
    weights: str = ""         # a local state-dict file for the external model


#: What an evaluation scores: the defense's deployed classifier (default) or its trained network.
CLASSIFIERS = (DEPLOYED, BASE)


@dataclass(frozen=True)
class EvalSettings:
    """How models are evaluated.

    ``classifier``: 'deployed' (default) scores what the defense deploys
    (:meth:`robust.defenses.base.Defense.deployed`: for an additive-noise defense
    the class voted by ``noisy_copies`` noisy copies, STN Algorithm 1); 'base'
    scores the trained network without it, only when asked.  Rows of anything
    but the default deployment are kept apart by their trial key,
    ``<trial>:base`` or ``<trial>:n=<N>`` (:meth:`evaluated_source`), so no
    summary, flag or shard plan mixes them with the default rows or skips them
    because those exist.
    """

    attacks: Tuple[str, ...]
    protocol: str = "independent"
    votes: int = 10
    batch_size: int = 128
    shard_size: int = 128
    max_examples: Optional[int] = None
    large_eps_examples: int = 8
    check_examples: int = 16
    classifier: str = DEPLOYED
    noisy_copies: int = 1

    def __post_init__(self) -> None:
        if self.shard_size % self.batch_size:
            raise ValueError(f"shard size {self.shard_size} must be a multiple of the batch size "
                             f"{self.batch_size}, so that sharding never changes a batch")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {self.classifier!r}; valid choices: {', '.join(CLASSIFIERS)}")
        if isinstance(self.noisy_copies, bool) or not isinstance(self.noisy_copies, int) or self.noisy_copies < 1:
            raise ValueError(f"noisy copies must be an integer >= 1, got {self.noisy_copies!r}")

    def evaluated_source(self, source: "ModelSource", model: nn.Module) -> "ModelSource":
        """``source`` under the trial key its rows are written with, ``model`` being what
        :func:`load_model` gave for these settings: the trial's own key for the default
        deployment (n = 1, or a defense that adds no noise), ``<trial>:base`` for the base
        network, ``<trial>:n=<N>`` for a noisy classifier over N > 1 copies."""
        if self.classifier == BASE:
            suffix = BASE
        elif self.noisy_copies > 1 and classifier_name(model) != DEPLOYED:
            suffix = f"n={self.noisy_copies}"
        else:
            return source
        return replace(source, trial=f"{source.trial}:{suffix}")


@dataclass(frozen=True)
class ShardJob:
    trial: str
    shard: int
    start: int
    stop: int


def completed_sources(storage: Storage, location: str) -> List[ModelSource]:
    """Every completed trial of the experiment at ``storage`` that has a checkpoint.
    ValueError (one line) when there is no experiment there."""
    if storage.filesystem.get_file_info(f"{storage.root}/data/trials").type.name != "Directory":
        raise ValueError(f"no experiment at {location}: data/trials/ not found")
    return [ModelSource(t["trial"], json.loads(t["config"]), checkpoint=t["checkpoint"])
            for t in read_kind(storage.filesystem, storage.root, "trials").to_pylist()
            if t["status"] == "completed" and t["checkpoint"]]


def select_trials(sources: Sequence[ModelSource], wanted: Sequence[str], location: str) -> List[ModelSource]:
    """The sources named in ``wanted`` (all when empty); ValueError naming an unknown trial
    and the valid ones, or saying that nothing is left."""
    known = {s.trial for s in sources}
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise ValueError(f"unknown trial {unknown[0]!r}; completed trials: {', '.join(sorted(known))}")
    chosen = [s for s in sources if not wanted or s.trial in wanted]
    if not chosen:
        raise ValueError(f"no completed trial with a checkpoint in {location}")
    return chosen


def load_model(source: ModelSource, storage: Storage, splits: DatasetSplits, classifier: str = DEPLOYED,
               noisy_copies: int = 1) -> nn.Module:
    """The classifier of ``source`` with its weights; raises on an architecture mismatch.

    ``classifier`` 'deployed' (default): what the trial's defense deploys around the
    trained network (:meth:`Defense.deployed`, e.g. STN's noisy classifier over
    ``noisy_copies`` copies); 'base': the trained network alone (certification,
    which adds its own noise, or ``--classifier base``).  An external model
    (``factory``) is deployed as given.
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; valid choices: {', '.join(CLASSIFIERS)}")
    spec = TrialSpec.from_dict(source.spec)
    if source.factory:
        module_name, _, function = source.factory.partition(":")
        model = getattr(importlib.import_module(module_name), function)()
        model.load_state_dict(torch.load(source.weights, map_location="cpu", weights_only=True))
        return model
    defense = build_defense(spec, splits)
    model = defense.prepare_model(build_model(spec, splits))
    model.load_state_dict(load_state(storage, source.checkpoint)["model"])  # strict: mismatches fail here
    return model if classifier == BASE else defense.deployed(model, noisy_copies)


def evaluate_job(job: ShardJob, source: ModelSource, settings: EvalSettings, storage: Storage, root: str,
                 model: Optional[nn.Module] = None, splits: Optional[DatasetSplits] = None) -> int:
    """Evaluate one shard of one model and write its files; returns the number of examples.

    ``model`` (default: loaded as ``settings`` ask) is the classifier scored; every row
    names it in ``classifier``: 'base', or the deployed classifier's name.
    """
    spec = TrialSpec.from_dict(source.spec)
    splits = splits if splits is not None else load_splits(spec)
    device = default_device()
    if model is None:
        model = load_model(source, storage, splits, settings.classifier, settings.noisy_copies)
    model = prepare_module(model, device)
    classifier = BASE if settings.classifier == BASE else classifier_name(model)
    attacks = parse_attacks(list(settings.attacks), splits.eps)
    columns = evaluate_shard(model, splits.test, range(job.start, job.stop), attacks, splits.eps, device,
                             seed=spec.seed, batch_size=settings.batch_size, protocol=settings.protocol,
                             votes=settings.votes, large_eps_examples=settings.large_eps_examples,
                             check_examples=settings.check_examples)
    for label, cols in columns.items():
        n = len(cols["example"])
        table = pa.table({**cols, "classifier": [classifier] * n, "config_id": [spec.config_id()] * n,
                          "seed": [spec.seed] * n, "shard": [job.shard] * n, "node": [node_name()] * n},
                         schema=ATTACK_SCHEMA)
        write_table(storage.filesystem, attack_path(root, spec.defense, job.trial, label, job.shard), table,
                    {**file_metadata({**spec.to_dict(), "evaluation": settings.__dict__}),
                     POSITIONS_KEY: f"{job.start}-{job.stop}"})
    return job.stop - job.start


class EvalWorker:
    """A Ray actor's state: the models it has loaded, by trial."""

    def __init__(self, storage: Storage, root: str, settings: EvalSettings) -> None:
        self.storage, self.root, self.settings = storage, root, settings
        self.loaded: Dict[str, Tuple[nn.Module, DatasetSplits]] = {}

    def run(self, job: ShardJob, source: ModelSource) -> int:
        if job.trial not in self.loaded:
            splits = load_splits(TrialSpec.from_dict(source.spec))
            model = load_model(source, self.storage, splits, self.settings.classifier, self.settings.noisy_copies)
            self.loaded[job.trial] = (model, splits)
        model, splits = self.loaded[job.trial]
        return evaluate_job(job, source, self.settings, self.storage, self.root, model, splits)


def labels_of(settings: EvalSettings, eps_data: float) -> List[str]:
    labels = [CLEAN] + [a.label for a in parse_attacks(list(settings.attacks), eps_data)]
    return labels + ([LARGE_EPS_LABEL] if settings.large_eps_examples > 0 else [])


def plan_jobs(sources: Sequence[ModelSource], settings: EvalSettings, storage: Storage, root: str,
              test_sizes: Dict[str, int], eps_data: Dict[str, float]) -> List[ShardJob]:
    """The (model, shard) jobs whose result files are not all there yet, or hold fewer
    examples than planned (a shard written as the short last shard of a run with a smaller
    ``max_examples`` is evaluated again, whole, and its files replaced).

    Raises ValueError where written shards start elsewhere than planned (the shard size
    changed): re-planning them would leave the old files' examples in twice.
    """
    fs = storage.filesystem
    jobs = []
    for source in sources:
        spec = TrialSpec.from_dict(source.spec)
        n = min(test_sizes[source.trial], settings.max_examples or test_sizes[source.trial])
        labels = labels_of(settings, eps_data[source.trial])
        def paths(index: int, trial: str = source.trial, defense: str = spec.defense,
                  labels: List[str] = labels) -> List[str]:
            return [attack_path(root, defense, trial, label, index) for label in labels]

        for shard, positions in enumerate(shard_positions(n, settings.shard_size)):
            if not _shard_done(fs, paths(shard), paths(shard + 1), shard, positions, test_sizes[source.trial],
                               f"trial {source.trial}", settings.shard_size):
                jobs.append(ShardJob(source.trial, shard, positions.start, positions.stop))
    return jobs


def _shard_done(fs, paths: List[str], following: List[str], shard: int, positions: range, test_size: int,
                what: str, shard_size: int) -> bool:
    """True when every file of the shard is there and holds the planned examples (or more,
    from the same start: nothing written is ever replaced by less).  A short shard may grow
    only where the next written shard starts at its new end: otherwise (another shard size)
    ValueError."""
    if not all(info.is_file for info in fs.get_file_info(paths)):
        return False
    written = {_written_range(fs, path, shard, test_size) for path in paths} - {None}
    if all(start == positions.start and stop >= positions.stop for start, stop in written):
        return True  # the planned examples, or more of them (a run with a larger max_examples)
    following = [p for p, info in zip(following, fs.get_file_info(following)) if info.is_file]
    moved = sorted(r for r in written if r[0] != positions.start)
    moved += sorted(r for r in {_written_range(fs, p, shard + 1, test_size) for p in following} - {None}
                    if r[0] < positions.stop)
    if moved:
        raise ValueError(
            f"{what}: examples {moved[0][0]}-{moved[0][1] - 1} were written as one shard, which shard size "
            f"{shard_size} cannot extend (shard {shard} is {positions.start}-{positions.stop - 1} now); evaluate "
            f"with the shard size of the earlier run (--shard-size) or into a fresh copy of the experiment")
    return False


#: File metadata key of the example positions [start, stop) a shard's files hold.
POSITIONS_KEY = "positions"


def _written_range(fs, path: str, shard: int, test_size: int) -> Optional[Tuple[int, int]]:
    """[start, stop) of the examples in a shard file: recorded in its footer, or (files from
    before the range was recorded) derived from the evaluation settings in its run config;
    None where neither is there."""
    meta = pq.read_schema(path, filesystem=fs).metadata or {}
    value = meta.get(POSITIONS_KEY.encode())
    if value is not None:
        start, stop = (int(v) for v in value.decode().split("-"))
        return start, stop
    evaluation = json.loads(meta.get(b"run_config", b"{}")).get("evaluation") or {}
    if "shard_size" not in evaluation:
        return None
    n = min(test_size, evaluation.get("max_examples") or test_size)
    shards = shard_positions(n, int(evaluation["shard_size"]))
    return (shards[shard].start, shards[shard].stop) if shard < len(shards) else None


def cpu_slots() -> int:
    """Actors of one CPU each that the cluster can place at once: more would never
    start, and a pool waiting on them would hang."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_pool(jobs: Sequence[ShardJob], sources: Sequence[ModelSource], settings: EvalSettings,
             storage: Storage, root: str, actors: int, gpus_per_actor: float = 0.0) -> int:
    """Run the jobs on ``actors`` Ray actors with a progress bar; returns examples evaluated.

    A job whose actor dies is retried on a fresh actor and recorded (:mod:`cluster.pool`).
    """
    import ray
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from cluster.pool import run_jobs

    if not jobs:
        return 0
    by_trial = {s.trial: s for s in sources}
    Worker = ray.remote(EvalWorker).options(num_cpus=1, num_gpus=gpus_per_actor, max_restarts=0,
                                            max_task_retries=0)
    total, done = sum(j.stop - j.start for j in jobs), 0
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as progress:
        bar = progress.add_task(f"evaluating {len(settings.attacks)} attack(s) on test examples", total=total)
        for _, n in run_jobs(lambda: Worker.remote(storage, root, settings), jobs,
                             lambda a, job: a.run.remote(job, by_trial[job.trial]), min(actors, cpu_slots()),
                             storage, root, describe=lambda j: f"evaluation trial={j.trial} shard={j.shard}"):
            done += n
            progress.update(bar, advance=n)
    return done


def finalize_checks(storage: Storage, root: str, sources: Sequence[ModelSource]) -> Dict[str, List[checks.Flag]]:
    """Compute every evaluated model's sanity flags from its rows and store them."""
    table = read_kind(storage.filesystem, root, "attack")
    out = {}
    for source in sources:
        rows = table.filter(pc.equal(table["trial"], source.trial))
        if rows.num_rows == 0:
            continue
        spec = TrialSpec.from_dict(source.spec)
        flags = checks.trial_flags(**flag_inputs(rows))
        out[source.trial] = flags
        data = pa.Table.from_pylist([{"flag": f.name, "tripped": f.tripped, "value": f.value,
                                      "detail": f.detail} for f in flags], schema=CHECK_SCHEMA)
        write_table(storage.filesystem, checks_path(root, spec.defense, source.trial), data,
                    file_metadata(spec.to_dict()))
    return out


def _threat(scores: TrialScores, label: str, spec: Optional[Any]) -> Tuple[str, float]:
    """(norm, eps) of a label's rows.  Labels that do not parse back to one spec are
    expansions of apgd-rand (apgd-ce-rand, apgd-dlr-rand): L-inf."""
    eps = float(pc.max(scores.rows.filter(pc.equal(scores.rows["attack"], label))["eps"]).as_py())
    return (spec.norm if spec is not None else "linf"), eps


def black_box_pairs(scores: TrialScores, black: Dict[str, Tuple[str, float]], white: Dict[str, Tuple[str, float]]
                    ) -> Dict[str, Tuple[float, str, float]]:
    """Each black-box attack against the strongest white-box attack whose threat model (norm, eps)
    contains its own, both accuracies on the examples all of them attacked (an attack may have
    its own cap; a cascade attacks only survivors)."""
    out = {}
    for label, threat in black.items():
        covering = [w for w, t in white.items() if checks.white_box_covers(threat, t)]
        examples = scores.common(label, *covering) if covering else set()
        if not examples:
            continue
        white_acc = {w: scores.accuracy(w, examples) for w in covering}
        strongest = min(white_acc, key=white_acc.get)
        out[label] = (scores.accuracy(label, examples), strongest, white_acc[strongest])
    return out


def flag_inputs(rows: pa.Table) -> Dict[str, Any]:
    """Aggregate one model's rows into the arguments of :func:`checks.trial_flags`.

    Every accuracy is the verdict's (mean of min(clean score, attack score)), and every
    comparison of two attacks is on the examples both attacked
    (:class:`robust.results.paired.TrialScores`).
    """
    scores = TrialScores(rows)
    clean = scores.rows.filter(pc.equal(scores.rows["attack"], CLEAN))
    specs = {a: spec_of_label(a) for a in scores.labels if a != CLEAN and not a.startswith(SANITY_PREFIX)}
    # minimal-norm attacks are unbounded: they enter only their own flag; eps-curve points are
    # other budgets, not stronger attacks; black-box attacks may be weaker than FGSM by design
    minimal = sorted(a for a, s in specs.items() if s is not None and s.minimal_norm)
    black = sorted(a for a, s in specs.items() if s is not None and not s.gradient_based)
    bounded = {a: s for a, s in specs.items() if a not in minimal and ":eps=" not in a}
    threats = {a: _threat(scores, a, s) for a, s in bounded.items()}
    white = {a: threats[a] for a in bounded if a not in black}
    single = sorted(a for a in white if bounded[a] is not None and bounded[a].attack == "fgsm")
    single_step = {(f, i): p for f in single for i in sorted(set(white) - set(single))
                   if checks.white_box_covers(threats[f], threats[i])
                   and (p := scores.compare(f, i)) is not None}
    steps = sorted((checks.pgd_steps(a), a) for a in white if checks.pgd_steps(a) is not None)
    by_steps = {(a, b): p for (a, la), (b, lb) in zip(steps, steps[1:])
                if (p := scores.compare(la, lb)) is not None}
    not_eot = rows.filter(pc.and_(pc.equal(rows["stochastic"], True), pc.equal(rows["eot_samples"], 1)))
    large = scores.robust(LARGE_EPS_LABEL) if LARGE_EPS_LABEL in scores.labels else {}
    return {
        "zero_grad": (int(pc.sum(clean["zero_grad"].cast(pa.int64())).as_py() or 0), clean.num_rows),
        "prob_like_fraction": pc.mean(clean["prob_like"].cast(pa.float64())).as_py() or 0.0,
        "large_eps_success_rate": 1.0 - scores.accuracy(LARGE_EPS_LABEL, set(large)) if large else None,
        "non_eot": sorted(set(not_eot["attack"].to_pylist()) & (set(specs) - set(black))),
        "single_step": single_step,
        "by_steps": by_steps,
        "black_box": black_box_pairs(scores, {a: threats[a] for a in black if a in bounded}, white),
        "minimal_norm_success": minimal_norm_success(scores, minimal),
        "eot": eot_convergence(scores),
    }


def minimal_norm_success(scores: TrialScores, labels: List[str]) -> Dict[str, float]:
    """label -> fraction of its attacked examples it made adversarial: the verdict's score
    below 1/2 (most of the R draws misclassify the point; deterministic: misclassified)."""
    out = {}
    for label in labels:
        attacked = scores.attacked(label)
        if attacked:
            out[label] = sum(score < 0.5 for score in attacked.values()) / len(attacked)
    return out
