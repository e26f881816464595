"""One Tune trial = one Ray Train run (Ray 2.60, Train V2).

``run_trial`` is the Tune function trainable (the trial driver).  It builds a
``TorchTrainer`` named after the Tune trial id, fits it, and forwards the
workers' per-epoch metrics to Tune with ``TuneReportCallback``.  The driver
itself takes a negligible CPU share so that driver plus workers fit on a
2-core laptop.  ``train_worker`` is the per-worker function: plain PyTorch
through :func:`robust.train.fit`, plus ``ray.train.report`` with a
checkpoint every epoch.  A restarted worker group resumes from the latest
checkpoint of the same (storage, name).
"""
from __future__ import annotations

import math
import os
import tempfile
import traceback
from typing import Any, Dict

import ray.train
import torch
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from cluster.records import STATE_FILE, load_state, node_name, write_epoch_rows, write_trial_row
from cluster.storage import Storage
from robust.spec import TrialSpec, build_trial
from robust.train import NonFiniteLoss, TrainState, fit

STATUS_KEY = "trial_status"


def train_worker(config: Dict[str, Any]) -> None:
    """Per-worker training function (runs on every Ray Train worker)."""
    spec = TrialSpec.from_dict(config["spec"])
    storage = Storage(config["storage"], config.get("endpoint"))
    trial, root, metric = config["trial"], config["root"], config["metric"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    parts = build_trial(spec)

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = TrainState(**torch.load(os.path.join(d, STATE_FILE), map_location="cpu",
                                             weights_only=False))

    node = node_name()

    def on_epoch_end(metrics: Dict[str, Any], state_fn) -> None:
        # Tune refuses a result without the scheduler's metric (strict metric checking):
        # NaN until the loop first computes it (every val_attack_every epochs)
        metrics = {metric: math.nan, **metrics, STATUS_KEY: "running", "node": node}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        state = state_fn()
        write_epoch_rows(storage, root, trial, spec, state["history"], node=node)
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    try:
        fit(parts.model, parts.defense, parts.splits, parts.train, seed=spec.seed, device=device,
            resume=resume, on_epoch_end=on_epoch_end)
    except NonFiniteLoss as err:
        # Reported, not raised: a NaN is a result of this configuration, and
        # retrying it from the last checkpoint would only reproduce it.
        ray.train.report({STATUS_KEY: "nan", "reason": str(err), "node": node, metric: math.nan},
                         checkpoint=None)


def run_trial(config: Dict[str, Any], base: Dict[str, Any], run: Dict[str, Any]) -> None:
    """Tune function trainable: resolve the trial's spec, train it with Ray Train, record it.

    ``run["metric"]`` is the defense's selection metric (the plan's, from its tuning
    module): every row of the trials table records it and its last validation value.
    """
    spec_dict = dict(base)
    spec_dict["seed"] = int(config["seed"])
    spec_dict["defense_config"] = {**base.get("defense_config", {}), **config.get("defense_config", {})}
    spec = TrialSpec.from_dict(spec_dict)
    trial = tune.get_context().get_trial_id()
    storage = Storage(run["storage"], run.get("endpoint"))
    root, node, metric = run["root"], node_name(), run["metric"]
    write_trial_row(storage, root, trial, spec, "running", node=node, metric=metric)

    use_gpu = run["gpus_per_worker"] > 0
    resources = {"CPU": run["cpus_per_worker"]}
    if use_gpu:
        resources["GPU"] = run["gpus_per_worker"]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.to_dict(), "trial": trial, "root": root, "metric": metric,
                           "storage": run["storage"], "endpoint": run.get("endpoint")},
        scaling_config=ScalingConfig(num_workers=run["workers"], use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=trial,
            storage_path=run["train_storage_path"],
            storage_filesystem=None if storage.is_local else storage.filesystem,
            callbacks=[TuneReportCallback()],
            # a lost worker or node: restart the worker group from the latest checkpoint
            failure_config=FailureConfig(max_failures=run["worker_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # recorded in our trials table, then re-raised for Tune
        write_trial_row(storage, root, trial, spec, "error", node=node, metric=metric,
                        reason=f"{type(err).__name__}: {err}"[:2000])
        traceback.print_exc()
        raise
    metrics = result.metrics or {}
    node = metrics.get("node", node)  # where rank 0 trained, not where this driver runs
    checkpoint = result.checkpoint.path if result.checkpoint is not None else ""
    history = load_state(storage, checkpoint)["history"] if checkpoint else []
    if metrics.get(STATUS_KEY) == "nan":
        write_trial_row(storage, root, trial, spec, "nan", node=node, reason=metrics.get("reason", ""),
                        history=history, checkpoint=checkpoint, metric=metric)
    else:
        write_trial_row(storage, root, trial, spec, "completed", node=node, history=history,
                        checkpoint=checkpoint, metric=metric)
