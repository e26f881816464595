"""Robustness scores (R2, R4 of Tibo et al.) sharded over a pool of Ray actors.

Test examples are split into fixed shards; a job is one (model, score, shard)
and writes one Parquet file (``robust.results.schema.score_path``) with a
deterministic name; jobs whose file exists are skipped on a re-run.  R4 needs
an autoencoder trained on the training split: it is trained once per dataset
(a seeded Ray task, on a GPU where there is one) and stored under
``<experiment>/artifacts/``, so every model of the experiment is scored with
the same sampler, as section 7 of the paper does.  All randomness of a batch
(PGD starts, the model's own noise) derives from (seed, position of the batch's
first example), and R4's eps sample and code noise from (seed, example index),
so a retried shard reproduces its rows and 1 actor or 8 give the same rows.
"""
from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import torch
from torch import nn

from cluster.evaluation import ModelSource, cpu_slots, load_model
from cluster.records import node_name
from cluster.storage import Storage
from robust.data.base import DatasetSplits, ImageSplit
from robust.device import default_device, prepare_input, prepare_module
from robust.evaluation.protocol import is_stochastic, shard_positions
from robust.results.schema import SCORE_SCHEMA, file_metadata, join, score_path, write_table
from robust.scores import check_scores
from robust.scores.autoencoder import Autoencoder, AutoencoderConfig, build_autoencoder, train_autoencoder
from robust.scores.r2 import R2_ATTACKS, R2Config, r2_margins
from robust.scores.r4 import R4Config, r4_scores
from robust.seeding import derive_seed
from robust.spec import TrialSpec, load_splits


@dataclass(frozen=True)
class ScoreSettings:
    """Which scores, on how many test examples, in which batches; the scores' own configs.

    ``seed`` seeds PGD's starts, R4's eps sample and code noise, and the autoencoder.
    """

    scores: Tuple[str, ...]
    batch_size: int = 64
    shard_size: int = 128
    max_examples: Optional[int] = None
    seed: int = 0
    r2: R2Config = field(default_factory=R2Config)
    r4: R4Config = field(default_factory=R4Config)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def __post_init__(self) -> None:
        check_scores(self.scores)
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError(f"batch and shard sizes must be >= 1, got {self.batch_size}, {self.shard_size}")
        if self.shard_size % self.batch_size:
            raise ValueError(f"shard size {self.shard_size} must be a multiple of the batch size "
                             f"{self.batch_size}, so that sharding never changes a batch")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {self.max_examples}")

    def r4_config(self) -> R4Config:
        return R4Config(**{**asdict(self.r4), "seed": self.seed})

    def ae_config(self) -> AutoencoderConfig:
        return AutoencoderConfig(**{**asdict(self.autoencoder), "seed": derive_seed(self.seed, 0xAE)})


@dataclass(frozen=True)
class ScoreJob:
    trial: str
    score: str
    shard: int
    start: int
    stop: int


# -- the autoencoder of R4, one per dataset ---------------------------------------------------

def autoencoder_path(root: str, spec: TrialSpec, settings: ScoreSettings) -> str:
    """Where the R4 autoencoder of ``spec``'s dataset lives (keyed by dataset and AE config)."""
    key = json.dumps({"dataset": spec.dataset, "dataset_config": spec.dataset_config,
                      "autoencoder": settings.ae_config().to_dict()}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return join(root, "artifacts", f"autoencoder-{spec.dataset}-{digest}.pt")


def _write_bytes(storage: Storage, path: str, data: bytes) -> None:
    fs = storage.filesystem
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    target = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}" if storage.is_local else path
    with fs.open_output_stream(target) as sink:
        sink.write(data)
    if target != path:
        fs.move(target, path)  # atomic rename; an object store shows an object only once complete


def train_and_store_autoencoder(storage: Storage, path: str, spec_dict: dict, settings: ScoreSettings) -> str:
    """Train the autoencoder on the training split of the spec's dataset and store its state."""
    splits = load_splits(TrialSpec.from_dict(spec_dict))
    ae = train_autoencoder(splits.train, settings.ae_config(), default_device())
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, buf)
    _write_bytes(storage, path, buf.getvalue())
    return path


def load_autoencoder(storage: Storage, path: str, splits: DatasetSplits, settings: ScoreSettings) -> Autoencoder:
    with storage.filesystem.open_input_file(path) as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    ae = build_autoencoder(tuple(splits.test[0][0].shape), settings.ae_config())
    ae.load_state_dict(state)
    return ae.eval().requires_grad_(False)


def ensure_autoencoders(sources: Sequence[ModelSource], settings: ScoreSettings, storage: Storage, root: str,
                        gpus: float = 0.0) -> List[str]:
    """Train (as Ray tasks) the autoencoders that R4 needs and that are not stored yet."""
    import ray

    if "r4" not in settings.scores:
        return []
    missing = {}
    for source in sources:
        spec = TrialSpec.from_dict(source.spec)
        path = autoencoder_path(root, spec, settings)
        if path not in missing and not storage.filesystem.get_file_info(path).is_file:
            missing[path] = source.spec
    task = ray.remote(train_and_store_autoencoder).options(num_cpus=1, num_gpus=min(gpus, 1.0) if gpus else 0)
    return ray.get([task.remote(storage, path, spec, settings) for path, spec in missing.items()])


# -- one job ---------------------------------------------------------------------------------------------

def _r2_rows(model: nn.Module, x: torch.Tensor, settings: ScoreSettings, eps: float, seed: int) -> Dict[str, list]:
    out = r2_margins(model, x, eps, settings.r2, seed)
    n = x.shape[0]
    rows = {"prediction": out["prediction"].tolist(), "value": out["margin"].double().tolist(),
            "found": out["found"].tolist(), "closest": out["closest"]}
    for a in R2_ATTACKS:
        rows[f"distance_{a}"] = out[f"distance_{a}"].double().tolist()
    rows.update({"samples": [None] * n, "eps_used": [None] * n, "agreement": [None] * n,
                 "sample_distance": [None] * n})
    return rows


def _r4_rows(model: nn.Module, x: torch.Tensor, indices: List[int], settings: ScoreSettings,
             ae: Autoencoder) -> Dict[str, list]:
    cfg = settings.r4_config()
    out = r4_scores(model, ae.to(x.device), x, indices, cfg)
    n = x.shape[0]
    rows = {"prediction": out["prediction"].tolist(), "value": out["score"].tolist(),
            "found": (out["eps_used"] > 0).tolist(), "closest": [""] * n,
            "samples": [cfg.samples] * n, "eps_used": out["eps_used"].tolist(),
            "agreement": out["agreement"].tolist(), "sample_distance": out["distance"].tolist()}
    rows.update({f"distance_{a}": [None] * n for a in R2_ATTACKS})
    return rows


def score_shard(model: nn.Module, split: ImageSplit, positions: range, score: str, settings: ScoreSettings,
                eps_data: float, device: torch.device, ae: Optional[Autoencoder] = None) -> Dict[str, list]:
    """Per-example columns of ``score`` on ``positions`` of ``split`` (SCORE_SCHEMA minus the bookkeeping)."""
    columns: Dict[str, list] = {}
    model.eval()
    for start in range(positions.start, positions.stop, settings.batch_size):
        batch = range(start, min(start + settings.batch_size, positions.stop))
        x, y, index = split.batch(list(batch))
        x = prepare_input(x, device)
        torch.manual_seed(derive_seed(settings.seed, start))  # the model's own noise, if any
        stochastic = is_stochastic(model, x)
        if score == "r2":
            rows = _r2_rows(model, x, settings, eps_data, derive_seed(settings.seed, start, 2))
        else:
            rows = _r4_rows(model, x, index.tolist(), settings, ae)
        rows.update({"example": index.tolist(), "label": y.tolist(), "stochastic": [stochastic] * len(batch)})
        for k, v in rows.items():
            columns.setdefault(k, []).extend(v)
    return columns


class ScoreWorker:
    """A Ray actor's state: the models and autoencoders it has loaded."""

    def __init__(self, storage: Storage, root: str, settings: ScoreSettings) -> None:
        self.storage, self.root, self.settings = storage, root, settings
        self.models: Dict[str, Tuple[nn.Module, DatasetSplits]] = {}
        self.autoencoders: Dict[str, Autoencoder] = {}

    def run(self, job: ScoreJob, source: ModelSource) -> int:
        spec = TrialSpec.from_dict(source.spec)
        device = default_device()
        if job.trial not in self.models:
            splits = load_splits(spec)
            self.models[job.trial] = (prepare_module(load_model(source, self.storage, splits), device), splits)
        model, splits = self.models[job.trial]
        ae = None
        if job.score == "r4":
            path = autoencoder_path(self.root, spec, self.settings)
            if path not in self.autoencoders:
                self.autoencoders[path] = load_autoencoder(self.storage, path, splits, self.settings).to(device)
            ae = self.autoencoders[path]
        cols = score_shard(model, splits.test, range(job.start, job.stop), job.score, self.settings,
                           splits.eps, device, ae)
        n = len(cols["example"])
        table = pa.table({**cols, "config_id": [spec.config_id()] * n, "seed": [spec.seed] * n,
                          "shard": [job.shard] * n, "node": [node_name()] * n},
                         schema=SCORE_SCHEMA)
        write_table(self.storage.filesystem, score_path(self.root, spec.defense, job.trial, job.score, job.shard),
                    table, file_metadata({**spec.to_dict(), "scoring": asdict(self.settings)}))
        return n


def plan_score_jobs(sources: Sequence[ModelSource], settings: ScoreSettings, storage: Storage, root: str,
                    test_sizes: Dict[str, int]) -> List[ScoreJob]:
    """The (model, score, shard) jobs whose file is not there yet."""
    jobs = []
    for source in sources:
        spec = TrialSpec.from_dict(source.spec)
        n = min(test_sizes[source.trial], settings.max_examples or test_sizes[source.trial])
        for score in settings.scores:
            for shard, positions in enumerate(shard_positions(n, settings.shard_size)):
                path = score_path(root, spec.defense, source.trial, score, shard)
                if not storage.filesystem.get_file_info(path).is_file:
                    jobs.append(ScoreJob(source.trial, score, shard, positions.start, positions.stop))
    return jobs


def run_scoring(sources: Sequence[ModelSource], settings: ScoreSettings, storage: Storage, root: str,
                actors: Optional[int] = None) -> int:
    """Score every model of ``sources`` (missing shards only); returns examples x scores computed."""
    import ray
    from ray.util import ActorPool
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from cluster.experiment import evaluation_actors

    n_actors, gpus = evaluation_actors(ray.cluster_resources())
    sizes = {s.trial: len(load_splits(TrialSpec.from_dict(s.spec)).test) for s in sources}
    jobs = plan_score_jobs(sources, settings, storage, root, sizes)
    if not jobs:
        return 0
    ensure_autoencoders([s for s in sources if any(j.trial == s.trial and j.score == "r4" for j in jobs)],
                        settings, storage, root, gpus)
    by_trial = {s.trial: s for s in sources}
    Worker = ray.remote(ScoreWorker).options(num_cpus=1, num_gpus=gpus, max_restarts=2, max_task_retries=2)
    count = max(1, min(actors or n_actors, len(jobs), cpu_slots()))
    pool = ActorPool([Worker.remote(storage, root, settings) for _ in range(count)])
    done = 0
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as progress:
        bar = progress.add_task(f"scoring {','.join(settings.scores)}", total=sum(j.stop - j.start for j in jobs))
        for n in pool.map_unordered(lambda a, job: a.run.remote(job, by_trial[job.trial]), jobs):
            done += n
            progress.update(bar, advance=n)
    return done
