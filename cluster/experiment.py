"""Run a whole experiment: search + train with Tune/Train, evaluate on test, summarise.

The launch script validates everything first (without importing Ray) and hands
an :class:`ExperimentPlan` here.  An experiment that already has Tune state
under its name is resumed: unfinished and errored trials continue from their
checkpoints, and only missing evaluation shards are computed.
"""
from __future__ import annotations

import itertools
import os
import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import pyarrow.compute as pc

from cluster.evaluation import EvalSettings, ModelSource, finalize_checks, plan_jobs, run_pool
from cluster.manifest import write_manifest
from cluster.storage import Storage
from robust.results.schema import read_kind

DRIVER_RESOURCE = "trial_driver"


@dataclass
class ExperimentPlan:
    """Everything resolved: what ``launch/tune.py`` will run."""

    name: str
    defense: str
    preset: str
    base_spec: Dict[str, Any]          # TrialSpec dict without the searched values and seed
    search: Dict[str, Any]             # defense_config key -> Ray Tune domain or fixed value
    samples: int
    seeds: int
    workers: int
    storage: str
    endpoint: Optional[str] = None
    address: Optional[str] = None
    worker_failures: int = 1          # Train: a lost worker/node restarts from the latest checkpoint
    trial_failures: int = 1           # Tune: a lost trial driver is restarted
    scheduler: str = "fifo"           # fifo | asha (early stopping on the validation metric)
    grace_period: int = 1             # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 3         # ASHA: keep the top 1/factor at each rung
    max_concurrent: Optional[int] = None  # cap on trials at a time (default: what the cluster fits)
    eval_shard_size: int = 128
    eval_batch_size: int = 128
    metric: str = ""                  # "": the defense's tuning module's METRIC (and MODE)
    mode: str = ""
    command: str = ""

    def __post_init__(self) -> None:
        # The selection metric lives once, in tuning/<defense>.py: Tune's scheduler and
        # every trial row read it from the plan.
        if not self.metric or not self.mode:
            from tuning import search_module

            module = search_module(self.defense)
            self.metric, self.mode = self.metric or module.METRIC, self.mode or module.MODE


@dataclass
class Resources:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    concurrency: int


def plan_resources(cluster: Dict[str, float], workers: int) -> Resources:
    """Per-worker resources and trial concurrency derived from the cluster's CPUs and GPUs."""
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    if gpus >= 1:
        workers = max(1, min(workers, int(gpus)))
        cpus_per_worker = max(1.0, min(4.0, math.floor(cpus / gpus)))
        concurrency = max(1, int(gpus // workers))
        return Resources(workers, cpus_per_worker, 1.0, concurrency)
    workers = max(1, min(workers, int(cpus)))
    return Resources(workers, 1.0, 0.0, max(1, int(cpus // workers)))


def draw_configurations(space: Dict[str, Any], samples: int, seed: int = 0) -> Optional[List[Dict[str, Any]]]:
    """``samples`` distinct configurations of a finite (all-categorical) space, drawn
    without replacement with a fixed seed; None when an axis is continuous.

    Tune's random sampling draws with replacement, which on a small discrete
    space repeats configurations and would count one seed twice in mean +- std.
    """
    axes = []
    for key, domain in sorted(space.items()):
        if hasattr(domain, "categories"):
            axes.append([(key, v) for v in domain.categories])
        elif hasattr(domain, "sample"):
            return None
        else:
            axes.append([(key, domain)])
    grid = [dict(combo) for combo in itertools.product(*axes)]
    random.Random(seed).shuffle(grid)
    return grid[:samples]


def _param_space(plan: ExperimentPlan) -> Tuple[Dict[str, Any], int]:
    """Tune's param space and num_samples: seeds are always a grid axis."""
    from ray import tune

    seeds = tune.grid_search(list(range(plan.seeds)))
    configs = draw_configurations(plan.search, plan.samples)
    if configs is not None:
        return {"seed": seeds, "defense_config": tune.grid_search(configs)}, 1
    return {"seed": seeds, "defense_config": dict(plan.search)}, plan.samples


def init_ray(address: Optional[str] = None) -> None:
    """Join the cluster at ``address``, or start a private local instance (never a stale one).

    Locally, trial drivers get a custom resource so that they never compete
    with training workers for CPUs.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        # Our data never travels through the object store (workers load datasets, checkpoints
        # go to storage), so a small explicit store leaves the memory to training.
        store_mb = int(os.environ.get("ROBUST_OBJECT_STORE_MB", "512"))
        ray.init(address="local", resources={DRIVER_RESOURCE: 1000}, include_dashboard=False,
                 log_to_driver=True, object_store_memory=store_mb * 1024 * 1024)


#: credentials Ray Tune would copy from the driver into every trial actor's runtime
#: environment (ray/tune/execution/class_cache.py)
CREDENTIAL_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                             "AWS_SESSION_TOKEN"})


def keep_credentials_out_of_runtime_envs() -> None:
    """Stop Ray Tune from putting AWS credentials into trial actors' runtime environments.

    Ray 2.60's Tune copies AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / session
    tokens from the driver's environment into each trainable's ``runtime_env``,
    and Ray's runtime_env_agent then writes that environment, secret included, to
    ``logs/runtime_env_agent.log`` in plain text (found by
    tests/test_cluster_scale.py, which scans every file Ray writes).  Workers do
    not need the copy: on a local instance they inherit the driver's environment
    through the raylet, and cluster nodes get credentials from their own AWS
    chain (the instance profile of ray_cluster.yaml).
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - CREDENTIAL_VARS


def trial_run(plan: ExperimentPlan, root: str, res: Resources) -> Dict[str, Any]:
    """What every trial driver (:func:`cluster.trial.run_trial`) needs besides its spec:
    storage, resources, and the selection metric its trial rows record."""
    return {"storage": plan.storage, "endpoint": plan.endpoint, "root": root,
            "train_storage_path": f"{root}/tune/train", "workers": res.workers,
            "cpus_per_worker": res.cpus_per_worker, "gpus_per_worker": res.gpus_per_worker,
            "worker_failures": plan.worker_failures, "metric": plan.metric}


def run_search(plan: ExperimentPlan, storage: Storage, root: str, res: Resources) -> None:
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from cluster.trial import run_trial

    keep_credentials_out_of_runtime_envs()
    run = trial_run(plan, root, res)
    driver = {DRIVER_RESOURCE: 1} if DRIVER_RESOURCE in ray.cluster_resources() else {"CPU": 0.01}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=plan.base_spec, run=run), driver)
    fs = None if storage.is_local else storage.filesystem
    tune_path = f"{root}/tune"
    param_space, num_samples = _param_space(plan)
    if tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=num_samples,
                # The same drawn configuration for every seed of the grid; the
                # concurrency limit lives on the generator (Tune ignores
                # max_concurrent_trials when a generator is passed).
                search_alg=BasicVariantGenerator(constant_grid_search=True, random_state=0,
                                                 max_concurrent=res.concurrency),
                scheduler=make_scheduler(plan)),
            run_config=tune.RunConfig(name="tune", storage_path=root, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=plan.trial_failures)),
        )
    grid = tuner.fit()
    mark_stopped(storage, root, grid, plan.metric)


SCHEDULERS = ("fifo", "asha")


def make_scheduler(plan: ExperimentPlan):
    """FIFO (every trial runs all epochs) or ASHA (Li et al. 2020) on the defense's
    validation metric, one rung unit per epoch."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if plan.scheduler == "fifo":
        return FIFOScheduler()
    epochs = int(plan.base_spec["train"]["epochs"])
    return ASHAScheduler(metric=plan.metric, mode=plan.mode, time_attr="training_iteration", max_t=epochs,
                         grace_period=min(plan.grace_period, epochs), reduction_factor=plan.reduction_factor)


def mark_stopped(storage: Storage, root: str, grid, metric: str) -> None:
    """Trials that a scheduler stopped early still say 'running' in our table: record
    them as 'stopped' with their last checkpoint (they are not evaluated)."""
    from cluster.records import load_state, write_trial_row
    from robust.spec import TrialSpec

    trials = read_kind(storage.filesystem, root, "trials")
    if trials.num_rows == 0:
        return
    running = {r["trial"]: r for r in trials.to_pylist() if r["status"] == "running"}
    for result in grid:
        trial = (result.metrics or {}).get("trial_id")
        if trial not in running or result.error is not None:
            continue
        row = running[trial]
        checkpoint = result.checkpoint.path if result.checkpoint is not None else ""
        history = load_state(storage, checkpoint)["history"] if checkpoint else []
        write_trial_row(storage, root, trial, TrialSpec.from_dict(json.loads(row["config"])), "stopped",
                        reason="stopped early by the scheduler", node=(result.metrics or {}).get("node", ""),
                        history=history, checkpoint=checkpoint, metric=metric)


def completed_trials(storage: Storage, root: str) -> List[Dict[str, Any]]:
    trials = read_kind(storage.filesystem, root, "trials")
    if trials.num_rows == 0:
        return []
    return trials.filter(pc.equal(trials["status"], "completed")).to_pylist()


def run_experiment(plan: ExperimentPlan) -> str:
    """Search, train, evaluate and summarise; returns the experiment root (display form)."""
    import ray

    storage = Storage(plan.storage, plan.endpoint)
    root = storage.experiment(plan.name)
    storage.filesystem.create_dir(root, recursive=True)
    write_manifest(storage, root, asdict(plan))
    init_ray(plan.address)
    res = plan_resources(ray.cluster_resources(), plan.workers)
    if plan.max_concurrent:
        res.concurrency = min(res.concurrency, plan.max_concurrent)
    configs = draw_configurations(plan.search, plan.samples)
    n_configs = len(configs) if configs is not None else plan.samples
    if configs is not None and n_configs < plan.samples:
        print(f"note: the search space has only {n_configs} distinct configuration(s); "
              f"running each once per seed instead of {plan.samples} draws", flush=True)
    print(f"experiment {storage.display(root)}: {n_configs} configuration(s) x {plan.seeds} seed(s), "
          f"{res.workers} worker(s) per trial, {res.concurrency} trial(s) at a time; selection metric "
          f"{plan.metric} ({plan.mode}, validation split)", flush=True)
    run_search(plan, storage, root, res)

    settings = EvalSettings(attacks=tuple(plan.base_spec["attacks"]), batch_size=plan.eval_batch_size,
                            shard_size=plan.eval_shard_size,
                            max_examples=plan.base_spec.get("max_test_examples"))
    sources = [ModelSource(t["trial"], json.loads(t["config"]), checkpoint=t["checkpoint"])
               for t in completed_trials(storage, root)]
    evaluate_sources(sources, settings, storage, root)
    return storage.display(root)


def evaluation_actors(cluster: Dict[str, float], per_gpu: int = 4) -> Tuple[int, float]:
    """(actors, GPUs per actor): one actor per CPU, or ``per_gpu`` actors sharing each GPU."""
    gpus = float(cluster.get("GPU", 0))
    if gpus >= 1:
        return int(gpus * per_gpu), 1.0 / per_gpu
    return max(1, int(cluster.get("CPU", 1))), 0.0


def evaluate_sources(sources: List[ModelSource], settings: EvalSettings, storage: Storage, root: str,
                     actors: Optional[int] = None) -> int:
    """Evaluate every model of ``sources`` (missing shards only) and store its sanity flags."""
    import ray

    from robust.spec import TrialSpec, load_splits

    sizes, eps = {}, {}
    for source in sources:
        splits = load_splits(TrialSpec.from_dict(source.spec))
        sizes[source.trial], eps[source.trial] = len(splits.test), splits.eps
    jobs = plan_jobs(sources, settings, storage, root, sizes, eps)
    n_actors, gpus = evaluation_actors(ray.cluster_resources())
    done = run_pool(jobs, sources, settings, storage, root, actors or n_actors, gpus)
    finalize_checks(storage, root, sources)
    return done
