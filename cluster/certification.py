"""Certification sharded over a pool of Ray actors.

Images are spread over the actors, and one image's n estimation samples may be
split into ``split`` contiguous chunk ranges computed on different actors: the
noise of chunk c of image i is seeded by (seed, i, c), so the counts of the
ranges add up to the counts of one unsplit pass, and 1 actor or 4 give
identical counts.  The driver adds the counts and certifies
(:func:`robust.certify.certify_from_counts`).  With early stopping an image is
certified on one actor (its looks are sequential).  One Parquet file per
(trial, sigma, shard of images); shards already written are skipped.

The smoothed classifier is built around the trained network itself (``load_model``
with ``classifier=BASE``): ``Smooth`` adds the noise, so an additive-noise
defense's deployed classifier, which already adds it, is never certified.
Rows state, per bound, whether it abstains (``abstain_<bound>``: Cohen's CERTIFY
abstains where its p_A lower bound is <= 1/2 even when the pair test predicts),
and Cohen et al.'s PREDICT on the estimation samples (``predict``, -1 = abstain;
``predict_correct`` counts abstain as wrong; null with early stopping).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from cluster.evaluation import ModelSource, cpu_slots, load_model
from cluster.records import node_name
from cluster.storage import Storage
from robust.certify import ABSTAIN, BOUNDS, Certificate, Smooth, certify_from_counts
from robust.defenses.base import BASE
from robust.device import default_device
from robust.results.schema import certify_path, file_metadata, write_table
from robust.spec import TrialSpec, load_splits


@dataclass(frozen=True)
class CertifySettings:
    sigma: float
    noise: str = "gaussian"
    n0: int = 100
    n: int = 100_000
    confidence: float = 0.999
    chunk: int = 64
    skip: int = 1
    max_examples: Optional[int] = None
    split: int = 1
    shard_size: int = 25
    radius: Optional[float] = None
    early_stop: bool = False
    bound: Optional[str] = None  # the bound early stopping decides by (default BOUNDS[noise][0])

    def positions(self, test_size: int) -> List[int]:
        """Cohen et al.'s subsample: every ``skip``-th test example, at most ``max_examples``."""
        positions = list(range(0, test_size, self.skip))
        return positions[: self.max_examples] if self.max_examples else positions


@dataclass(frozen=True)
class CountJob:
    """Counts of one image: the selection stream (first_chunk -1) or a range of estimation chunks;
    ``certify`` marks an early-stopping job that certifies the image whole."""

    trial: str
    position: int
    first_chunk: int
    num_samples: int
    certify: bool = False


class CertifyWorker:
    """A Ray actor's state: the smoothed models it has loaded, by trial."""

    def __init__(self, storage: Storage, settings: CertifySettings) -> None:
        self.storage, self.settings = storage, settings
        self.loaded: Dict[str, Tuple[Smooth, object]] = {}

    def _smooth(self, source: ModelSource):
        if source.trial not in self.loaded:
            spec = TrialSpec.from_dict(source.spec)
            splits = load_splits(spec)
            model = load_model(source, self.storage, splits, classifier=BASE).to(default_device()).eval()
            s = self.settings
            self.loaded[source.trial] = (Smooth(model, splits.num_classes, s.sigma, s.noise, chunk=s.chunk,
                                                seed=spec.seed), splits)
        return self.loaded[source.trial]

    def run(self, job: CountJob, source: ModelSource):
        smooth, splits = self._smooth(source)
        x, _, index = splits.test[job.position]
        started = time.perf_counter()
        s = self.settings
        if job.certify:
            cert = smooth.certify(x, s.n0, s.n, s.confidence, image_id=int(index), radius=s.radius,
                                  early_stop=True, bound=s.bound)
            return job, cert, time.perf_counter() - started, node_name()
        stream = "select" if job.first_chunk < 0 else "estimate"
        counts = smooth.sample_counts(x, job.num_samples, int(index), max(job.first_chunk, 0), stream)
        return job, counts, time.perf_counter() - started, node_name()


def plan_count_jobs(trial: str, positions: Sequence[int], settings: CertifySettings) -> List[CountJob]:
    """Selection + ``split`` estimation ranges per image (or one certify job with early stopping)."""
    jobs = []
    chunks = math.ceil(settings.n / settings.chunk)
    per_part = math.ceil(chunks / settings.split)
    for p in positions:
        if settings.early_stop:
            jobs.append(CountJob(trial, p, 0, settings.n, certify=True))
            continue
        jobs.append(CountJob(trial, p, -1, settings.n0))
        for first in range(0, chunks, per_part):
            last = min(first + per_part, chunks)
            jobs.append(CountJob(trial, p, first, min(settings.n, last * settings.chunk) - first * settings.chunk))
    return jobs


def certificate_from_parts(parts: Dict[int, np.ndarray], settings: CertifySettings) -> Certificate:
    """Certify from the counts of one image's jobs (selection under key -1, ranges by first chunk)."""
    estimate = sum(v for k, v in parts.items() if k >= 0)
    stored = {"select": parts[-1], "estimate": estimate}

    def sampler(num: int, first_sample: int, stream: str) -> np.ndarray:
        assert first_sample == 0, "counts are assembled for whole streams"
        return stored[stream]

    return certify_from_counts(sampler, settings.n0, settings.n, settings.confidence, settings.sigma,
                               settings.noise)


def certificate_rows(certs: Sequence[Tuple[int, int, Certificate, float, str]], spec: TrialSpec, shard: int,
                     settings: CertifySettings) -> pa.Table:
    """Per-example rows: (example, label, certificate, seconds, nodes) -> the certify table;
    ``nodes`` names the Ray nodes whose actors drew the image's samples."""
    rows = []
    for example, label, cert, seconds, nodes in certs:
        row = {"example": example, "label": label, "prediction": cert.prediction,
               "abstain": cert.prediction == ABSTAIN, "correct": cert.prediction == label,
               "p1_lower": cert.p1_lower, "p2_upper": cert.p2_upper, "n": cert.n, "n0": cert.n0,
               "confidence": cert.confidence, "noise": cert.noise,  # sigma: in the path
               "seconds": seconds, "samples_used": cert.samples_used,
               "config_id": spec.config_id(), "seed": spec.seed, "shard": shard, "node": nodes}
        row.update({f"radius_{b}": float(cert.radius[b]) for b in BOUNDS[settings.noise]})
        row.update({f"abstain_{b}": cert.abstains(b) for b in BOUNDS[settings.noise]})
        row["predict"] = cert.predict
        row["predict_correct"] = None if cert.predict is None else cert.predict == label
        rows.append(row)
    table = pa.Table.from_pylist(rows)
    # typed even when every value is null (early stopping), so shards of one kind share a schema
    for name, kind in (("predict", pa.int64()), ("predict_correct", pa.bool_())):
        table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(kind))
    return table


def run_certification(sources: Sequence[ModelSource], settings: CertifySettings, storage: Storage, root: str,
                      actors: int, gpus_per_actor: float = 0.0) -> int:
    """Certify every model of ``sources`` on the chosen test examples; returns images certified."""
    import ray
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from cluster.pool import run_jobs

    fs = storage.filesystem
    pending_shards: Dict[Tuple[str, int], List[int]] = {}
    jobs: List[CountJob] = []
    specs = {s.trial: TrialSpec.from_dict(s.spec) for s in sources}
    labels: Dict[str, object] = {}
    for source in sources:
        spec = specs[source.trial]
        splits = load_splits(spec)
        labels[source.trial] = splits.test
        positions = settings.positions(len(splits.test))
        for shard, start in enumerate(range(0, len(positions), settings.shard_size)):
            path = certify_path(root, spec.defense, source.trial, settings.sigma, shard)
            if fs.get_file_info(path).is_file:
                continue
            members = positions[start:start + settings.shard_size]
            pending_shards[(source.trial, shard)] = members
            jobs.extend(plan_count_jobs(source.trial, members, settings))
    if not jobs:
        return 0
    by_trial = {s.trial: s for s in sources}
    Worker = ray.remote(CertifyWorker).options(num_cpus=1, num_gpus=gpus_per_actor, max_restarts=0,
                                               max_task_retries=0)
    parts: Dict[Tuple[str, int], Dict[int, np.ndarray]] = {}
    seconds: Dict[Tuple[str, int], float] = {}
    nodes: Dict[Tuple[str, int], set] = {}
    certs: Dict[Tuple[str, int], Certificate] = {}
    expected = {}
    for job in jobs:
        expected[(job.trial, job.position)] = expected.get((job.trial, job.position), 0) + 1
    shard_of = {(t, p): shard for (t, shard), members in pending_shards.items() for p in members}
    written = 0
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as progress:
        bar = progress.add_task(f"certifying (sigma {settings.sigma}, n {settings.n})",
                                total=len(expected))
        for job, (_, result, spent, node) in run_jobs(
                lambda: Worker.remote(storage, settings), jobs, lambda a, j: a.run.remote(j, by_trial[j.trial]),
                min(actors, cpu_slots()), storage, root,
                describe=lambda j: f"certification trial={j.trial} example={j.position} chunk={j.first_chunk}"):
            key = (job.trial, job.position)
            seconds[key] = seconds.get(key, 0.0) + spent
            nodes.setdefault(key, set()).add(node)
            if job.certify:
                certs[key] = result
            else:
                parts.setdefault(key, {})[job.first_chunk] = result
                if len(parts[key]) == expected[key]:
                    certs[key] = certificate_from_parts(parts.pop(key), settings)
            if key in certs:
                progress.update(bar, advance=1)
                written += _write_if_complete(key, pending_shards, shard_of, certs, seconds, nodes, labels,
                                              specs, settings, storage, root)
    return written


def _write_if_complete(key, pending_shards, shard_of, certs, seconds, nodes, labels, specs, settings, storage,
                       root) -> int:
    trial, shard = key[0], shard_of[key]
    members = pending_shards[(trial, shard)]
    if not all((trial, p) in certs for p in members):
        return 0
    split = labels[trial]
    rows = []
    for p in members:
        _, y, index = split[p]
        rows.append((int(index), int(y), certs[(trial, p)], seconds[(trial, p)],
                     ",".join(sorted(nodes[(trial, p)]))))
    spec = specs[trial]
    table = certificate_rows(rows, spec, shard, settings)
    write_table(storage.filesystem, certify_path(root, spec.defense, trial, settings.sigma, shard), table,
                file_metadata({**spec.to_dict(), "certification": asdict(settings)}))
    return len(members)
