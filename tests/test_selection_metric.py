"""Selection reads each defense's own validation metric: the metric lives once, in the
defense's tuning module; the plan, Tune's scheduler and every trial row carry it, and
the trial row's value is the validation number the training loop reported to Tune."""
from __future__ import annotations

import math
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from helpers import quick_config, small_model

from cluster.experiment import ExperimentPlan, plan_resources, trial_run
from cluster.records import STATE_FILE, load_state, write_trial_row
from cluster.storage import Storage
from robust.data import create_dataset
from robust.data.base import ImageSplit
from robust.defenses import create_defense, defense_names
from robust.results.schema import read_kind
from robust.spec import TrialSpec
from robust.train import fit
from tuning import search_module

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
LOOP_METRICS = {"val_acc", "val_pgd_acc"}  # what the loop itself reports; defenses add their own
#: the smallest validation budgets of the defenses that compute their own metric (a key test, not a number)
CHEAP = {"val_examples": 2, "val_steps": 1, "val_eot_steps": 1, "val_eot_samples": 2, "val_n": 20}


def _head(split: ImageSplit, n: int) -> ImageSplit:
    return ImageSplit(split.images[:n], split.labels[:n], split.indices[:n])


@pytest.fixture(scope="module")
def synthetic():
    return create_dataset("synthetic")


def _plan(defense: str) -> ExperimentPlan:
    return ExperimentPlan(name="e", defense=defense, preset="smoke", base_spec={}, search={}, samples=1,
                          seeds=1, workers=1, storage="/tmp")


@pytest.mark.parametrize("name", defense_names())
def test_every_defense_reports_the_metric_its_tuning_module_names(name, synthetic):
    """A metric the loop never reports would leave Tune and the trial rows without a value."""
    module = search_module(name)
    settings = {f.name for f in fields(create_defense(name, eps_data=synthetic.eps).config)}
    defense = create_defense(name, eps_data=synthetic.eps, **{k: v for k, v in CHEAP.items() if k in settings})
    model = defense.prepare_model(small_model(synthetic)).eval()
    reported = LOOP_METRICS | set(defense.validation_metrics(model, _head(synthetic.val, 2), CPU, 0))
    assert module.METRIC in reported and module.MODE == "max"
    plan = _plan(name)  # the plan (Tune's scheduler) and every trial driver read the module's metric
    assert (plan.metric, plan.mode) == (module.METRIC, module.MODE)
    assert trial_run(plan, "/tmp/e", plan_resources({"CPU": 2.0}, 1))["metric"] == module.METRIC


def test_launch_plans_the_defenses_own_metric(tmp_path):
    sys.path.insert(0, str(ROOT / "launch"))
    import tune

    args = tune.build_parser().parse_args(["--defense", "pni", "--storage", str(tmp_path), "--name", "e"])
    plan = tune.build_plan(args, tune.resolve(args))
    assert plan.metric == search_module("pni").METRIC == "val_eot_pgd_acc"


def test_the_trial_row_records_the_metric_and_the_value_tune_saw(tmp_path, synthetic):
    """pni is tuned on EOT-PGD accuracy, not PGD accuracy: its trial row names that metric and
    holds the last value the loop reported to Tune, read back from the checkpoint as the
    trial driver does."""
    small = replace(synthetic, train=_head(synthetic.train, 64), val=_head(synthetic.val, 16))
    defense = create_defense("pni", eps_data=small.eps, steps=1, val_examples=16, val_eot_steps=2,
                             val_eot_samples=2)
    metric = _plan("pni").metric
    assert metric != "val_pgd_acc"
    storage = Storage(str(tmp_path))
    root = storage.experiment("e")
    spec = TrialSpec(defense="pni", dataset="synthetic", model="small-cnn", seed=0)
    write_trial_row(storage, root, "t0", spec, "running", metric=metric)
    running, = read_kind(storage.filesystem, root, "trials").to_pylist()
    assert running["metric"] == metric and math.isnan(running["metric_value"])  # nothing reported yet

    reported = []  # what train_worker hands to ray.train.report, epoch by epoch: what Tune sees
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()

    def on_epoch_end(metrics, state_fn):
        reported.append(metrics)
        torch.save(state_fn(), checkpoint / STATE_FILE)

    fit(small_model(small), defense, small, quick_config(epochs=2, val_attack_steps=1), seed=0, device=CPU,
        on_epoch_end=on_epoch_end)
    history = load_state(storage, str(checkpoint))["history"]
    write_trial_row(storage, root, "t0", spec, "completed", history=history, checkpoint=str(checkpoint),
                    metric=metric)
    row, = read_kind(storage.filesystem, root, "trials").to_pylist()
    assert row["metric"] == "val_eot_pgd_acc"
    assert row["metric_value"] == reported[-1]["val_eot_pgd_acc"]
    assert row["val_pgd_acc"] == reported[-1]["val_pgd_acc"]  # still recorded beside it


def test_a_model_that_was_not_tuned_has_no_metric(tmp_path):
    storage = Storage(str(tmp_path))
    root = storage.experiment("e")
    write_trial_row(storage, root, "external-1", TrialSpec(defense="standard", dataset="digits",
                                                           model="small-cnn"), "completed")
    row, = read_kind(storage.filesystem, root, "trials").to_pylist()
    assert row["metric"] is None and math.isnan(row["metric_value"])
