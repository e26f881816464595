#!/usr/bin/env python
"""Search, train and evaluate a defense on a local Ray instance or a Ray cluster.

    python launch/tune.py --defense constant                 # embedded `smoke` preset, minutes on a CPU
    python launch/tune.py --defense constant --preset paper  # the paper's CIFAR-10 setup, for a cluster
    python launch/tune.py --defense constant --preset paper --dry-run   # the plan and its GPU-hours, no run
    python launch/tune.py --defense constant --name EXP --resume        # continue EXP after a crash

Everything is validated before Ray is imported or anything is written; bad
input gets one line naming the problem and the valid choices, and exit code 2.
"""
from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
import time
from typing import Any, Dict, List, Optional

from cluster.cli import OneLineParser, UsageError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tune.py", description="Search, train and evaluate a randomized defense.")
    p.add_argument("--defense", required=True, help="defense to train (e.g. constant, standard, pgd-at)")
    p.add_argument("--preset", default="smoke", help="smoke (default, embedded digits) or paper")
    p.add_argument("--dataset", help="override the preset's dataset")
    p.add_argument("--model", help="override the preset's model")
    p.add_argument("--samples", type=int, help="configurations Tune draws from the search space")
    p.add_argument("--seeds", type=int, help="run every configuration with seeds 0..S-1")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--workers", type=int, help="Ray Train workers per trial (DDP)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a defense setting (removed from the search), e.g. --set copies=10")
    p.add_argument("--storage", default="./results", help="results directory or s3://bucket/prefix")
    p.add_argument("--endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--name", help="experiment name (default: <defense>-<preset>-<time>); must be new "
                   "unless --resume")
    p.add_argument("--resume", action="store_true", help="continue the experiment --name: unfinished and "
                   "errored trials from their last checkpoints, only missing evaluation shards")
    p.add_argument("--dry-run", action="store_true", help="validate everything and print the plan "
                   "(trials, epochs, GPUs, concurrency, GPU-hours); train nothing")
    p.add_argument("--scheduler", default="fifo", help="fifo (default) or asha (early stopping on the "
                   "validation metric)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--worker-failures", type=int, default=1, help="restarts of a trial's worker group "
                   "(lost worker or node) from its latest checkpoint")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at a time (default: "
                   "as many as the cluster's CPUs/GPUs fit)")
    p.add_argument("--trial-failures", type=int, default=1, help="restarts of a lost trial driver")
    p.add_argument("--gpu-tflops", type=float, default=None, help="sustained TFLOP/s per GPU for the "
                   "--dry-run estimate (default 40)")
    p.add_argument("--address", help="Ray cluster address (e.g. auto); default: a private local instance")
    p.add_argument("--max-test-examples", type=int, help="evaluate at most this many test examples")
    p.add_argument("--data-dir", help="where datasets are downloaded (default $ROBUST_DATA_DIR)")
    return p


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word, e.g. distribution=gaussian


def parse_settings(items: List[str]) -> Dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """Validate every argument and resolve the experiment; raises UsageError. Imports no Ray."""
    from cluster.storage import Storage
    from robust.data import dataset_eps, dataset_names
    from robust.defenses import create_defense, defense_names
    from robust.models import check_model_name
    from robust.presets import get_preset
    from robust.registry import UnknownNameError
    from robust.train.config import TrainConfig

    try:
        if args.defense not in defense_names():
            raise UnknownNameError(f"unknown defense {args.defense!r}; valid choices: "
                                   f"{', '.join(defense_names())}")
        preset = get_preset(args.defense, args.preset)
        dataset = args.dataset or preset.dataset
        if dataset not in dataset_names():
            raise UnknownNameError(f"unknown dataset {dataset!r}; valid choices: {', '.join(dataset_names())}")
        model = args.model or preset.model
        check_model_name(model)
        for flag in ("samples", "seeds", "epochs", "workers", "max_test_examples", "grace_period",
                     "max_concurrent"):
            _positive("--" + flag.replace("_", "-"), getattr(args, flag))
        for flag in ("worker_failures", "trial_failures"):
            if getattr(args, flag) < 0:
                raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
        from cluster.experiment import SCHEDULERS
        if args.scheduler not in SCHEDULERS:
            raise UsageError(f"unknown scheduler {args.scheduler!r}; valid choices: {', '.join(SCHEDULERS)}")
        if args.gpu_tflops is not None and not args.gpu_tflops > 0:
            raise UsageError(f"--gpu-tflops must be > 0, got {args.gpu_tflops}")
        if args.resume and not args.name:
            raise UsageError("--resume needs --name, the experiment to continue")
        train = dict(preset.train)
        if args.epochs is not None:
            train["epochs"] = args.epochs
        TrainConfig(**train)
        fixed = {**preset.defense_config, **parse_settings(args.set)}
        try:
            create_defense(args.defense, eps_data=dataset_eps(dataset), **fixed).check_train_config(
                TrainConfig(**train))
        except TypeError as err:  # an unknown setting name
            raise UsageError(f"invalid --set for defense {args.defense!r}: {err}") from None
        name = args.name or f"{args.defense}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UsageError(f"experiment name {name!r} may use only letters, digits, '.', '_' and '-'")
        Storage(args.storage, args.endpoint).check()  # malformed, unreachable, missing bucket
    except (UnknownNameError, ValueError) as err:
        raise UsageError(str(err)) from None
    dataset_config = dict(preset.dataset_config)
    if args.data_dir:
        dataset_config["data_dir"] = args.data_dir
    scoped_samples = args.samples
    return {
        "preset": preset, "dataset": dataset, "model": model, "train": train, "fixed": fixed,
        "name": name, "dataset_config": dataset_config, "eps_data": dataset_eps(dataset),
        "samples": scoped_samples,
    }


def build_plan(args: argparse.Namespace, r: Dict[str, Any]):
    """The ExperimentPlan (imports the Ray-side modules: only after validation)."""
    from cluster.experiment import ExperimentPlan
    from tuning import search_module

    preset = r["preset"]
    module = search_module(args.defense)
    # The smoke preset searches the documented smoke subset; `paper` runs the
    # paper's configuration unless --samples asks for a search of the full space.
    if preset.search == "smoke":
        space = module.smoke_space(r["eps_data"])
    elif args.samples:
        space = module.space(r["eps_data"])
    else:
        space = {}
    space = {k: v for k, v in space.items() if k not in r["fixed"]}
    check_space(args.defense, r["eps_data"], r["fixed"], space)
    samples = args.samples or (preset.samples if space else 1)
    base = {
        "defense": args.defense, "dataset": r["dataset"], "model": r["model"], "seed": 0,
        "defense_config": r["fixed"], "dataset_config": r["dataset_config"],
        "model_config": dict(preset.model_config) if not args.model else {},
        "train": r["train"], "attacks": list(preset.attacks),
        "max_test_examples": args.max_test_examples or preset.max_test_examples,
    }
    if args.scheduler == "asha" and not space:
        raise UsageError("--scheduler asha needs a search: this preset runs a single configuration "
                         "(pass --samples N to search the full space)")
    return ExperimentPlan(
        name=r["name"], defense=args.defense, preset=args.preset, base_spec=base, search=space,
        samples=samples, seeds=args.seeds or preset.seeds, workers=args.workers or preset.workers_per_trial,
        storage=args.storage, endpoint=args.endpoint, address=args.address,
        worker_failures=args.worker_failures, trial_failures=args.trial_failures,
        scheduler=args.scheduler, grace_period=args.grace_period, max_concurrent=args.max_concurrent,
        command=shlex.join(["launch/tune.py"] + sys.argv[1:]),
    )  # metric and mode: the defense's tuning module's METRIC and MODE (ExperimentPlan fills them)


def check_name(plan, resume: bool) -> None:
    """A new name must be free; --resume needs an existing experiment run with the same
    configuration.  Reads the manifest only; writes nothing."""
    from cluster.manifest import plan_identity, read_manifest
    from cluster.storage import Storage

    storage = Storage(plan.storage, plan.endpoint)
    root = storage.experiment(plan.name)
    manifest = read_manifest(storage, root)
    where = storage.display(root)
    if manifest is None:
        if resume:
            raise UsageError(f"--resume: no experiment {plan.name!r} at {where}")
        return
    if not resume:
        raise UsageError(f"experiment {plan.name!r} already exists at {where}; pass --resume to continue "
                         f"it, or choose another --name")
    old, new = plan_identity(manifest["plan"]), plan_identity(plan)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise UsageError(f"--resume with a different configuration ({', '.join(changed)} changed) than "
                         f"experiment {plan.name!r}; rerun with its original options: "
                         f"{manifest['runs'][0].get('command', '')}")


def print_dry_run(plan, tflops: Optional[float]) -> None:
    """The plan without running it: trials, epochs, resources, concurrency, GPU-hours."""
    from cluster.experiment import Resources, draw_configurations, plan_resources
    from robust.cost import DEFAULT_GPU_TFLOPS, estimate, forward_flops
    from robust.data import DATASETS
    from robust.evaluation.suite import parse_attacks
    from robust.data import dataset_eps
    from robust.defenses import create_defense
    from robust.train.config import TrainConfig

    base = plan.base_spec
    configs = draw_configurations(plan.search, plan.samples)
    n_configs = len(configs) if configs is not None else plan.samples
    trials = n_configs * plan.seeds
    train = TrainConfig(**base["train"])
    ds = DATASETS.get(base["dataset"])
    val = round(ds.train_size * 0.1)
    test = min(ds.test_size, base.get("max_test_examples") or ds.test_size)
    flops = forward_flops(base["model"], base["dataset"], base.get("model_config"))
    defense = create_defense(plan.defense, eps_data=dataset_eps(base["dataset"]), **base["defense_config"])
    attacks = parse_attacks(list(base["attacks"]), ds.eps)
    cost = estimate(flops_per_example=flops, trials=trials, epochs=train.epochs,
                    train_examples=ds.train_size - val, val_examples=val, test_examples=test,
                    defense_passes=defense.train_passes(), val_attack_steps=train.val_attack_steps,
                    val_attack_every=train.val_attack_every, attack_params=[a.params for a in attacks],
                    gpu_tflops=tflops or DEFAULT_GPU_TFLOPS)
    cluster = None
    if plan.address:
        import ray

        ray.init(address=plan.address)
        cluster = ray.cluster_resources()
    if cluster is not None:
        res = plan_resources(cluster, plan.workers)
        where = f"cluster at {plan.address}: {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs"
    else:
        res = Resources(plan.workers, 4.0, 1.0, 0)
        where = "not connected (pass --address to size concurrency from a running cluster)"
    gpus_per_trial = res.workers * res.gpus_per_worker
    lines = [
        f"dry run: experiment {plan.name!r} ({plan.defense}, preset {plan.preset}) -> {plan.storage}",
        f"  dataset {base['dataset']} ({ds.train_size - val} train / {val} val / {test} test), "
        f"model {base['model']} ({flops / 1e9:.3g} GFLOPs per example forward)",
        f"  trials: {n_configs} configuration(s) x {plan.seeds} seed(s) = {trials}",
        f"  epochs per trial: {train.epochs} (batch {train.batch_size}, {train.optimizer}, lr {train.lr:g}, "
        f"{train.schedule}); scheduler {plan.scheduler}",
        f"  selection metric: {plan.metric} ({plan.mode}) on the validation split (tuning/"
        f"{plan.defense.replace('-', '_')}.py); Tune and the summary's best seed read it",
        f"  per trial: {res.workers} worker(s) x {res.gpus_per_worker:g} GPU = {gpus_per_trial:g} GPU(s); "
        f"defense cost {defense.train_passes():g}x a plain step",
        f"  {where}" + (f"; {res.concurrency} trial(s) at a time" if cluster is not None else ""),
        f"  evaluation: {', '.join(a.label for a in attacks)} on {test} test examples",
        f"  estimate: {cost.train_flops / 1e15:.3g} PFLOP training + {cost.eval_flops / 1e15:.3g} PFLOP "
        f"evaluation = {cost.gpu_hours:.3g} GPU-hours at {cost.gpu_tflops:g} TFLOP/s per GPU",
        "  nothing was trained, written or downloaded",
    ]
    print("\n".join(lines))


def check_space(defense: str, eps_data: float, fixed: Dict[str, Any], space: Dict[str, Any]) -> None:
    """Build the defense with every value of every categorical axis, so that a bad
    search space fails here, before Ray starts, and not once per trial."""
    from robust.defenses import create_defense

    for key, domain in space.items():
        for value in getattr(domain, "categories", [domain]):
            try:
                create_defense(defense, eps_data=eps_data, **{**fixed, key: value})
            except (TypeError, ValueError) as err:
                raise UsageError(f"search space of {defense!r}: {key}={value!r} is invalid: {err}") from None


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolved = resolve(args)
    except UsageError as err:
        parser.error(str(err))
    try:
        plan = build_plan(args, resolved)
        if args.dry_run:
            print_dry_run(plan, args.gpu_tflops)
            return 0
        check_name(plan, args.resume)
    except UsageError as err:
        parser.error(str(err))

    from cluster.experiment import run_experiment

    root = run_experiment(plan)
    import summarize

    print(f"\nresults: {root}\n")
    return summarize.show(root, plan.endpoint)


if __name__ == "__main__":
    sys.exit(main())
