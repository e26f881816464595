#!/usr/bin/env python
"""Evaluate trained models under attacks, sharded over a pool of Ray actors.

    python launch/evaluate.py results/<experiment> --attacks fgsm,pgd-20,eot-pgd,apgd-rand
    python launch/evaluate.py results/<experiment> --trial <trial id> --attacks apgd-ce --max-examples 500
    python launch/evaluate.py results/<experiment> --eps-curve pgd-20 --eps-values 0.02,0.05,0.1,0.2
    python launch/evaluate.py results/external --model-factory mypkg.models:build --weights w.pt \\
        --dataset cifar10 --attacks apgd-rand
    python launch/evaluate.py results/<experiment> --transfer seeds --attacks fgsm,pgd-20
    python launch/evaluate.py results/<experiment> --transfer-from <trial id> --attacks pgd-20
    python launch/evaluate.py results/<experiment> --transfer-from mypkg.models:build --source-weights w.pt
    python launch/evaluate.py results/<experiment> --noisy-copies 5 --attacks pgd-l2-20,smoothed-pgd:sigma=0.25
    python launch/evaluate.py results/<experiment> --classifier base --attacks pgd-20

Every model is evaluated as the classifier its defense deploys: an additive-noise
defense (stn) as the class voted by --noisy-copies N noisy copies x + r (STN
Algorithm 1; N = 1 by default, x -> f(x + r)), a stochastic model that attacks
meet with EOT through the noise.  --classifier base scores the trained network
without its deployment instead; its rows are labelled 'base'.  Rows other than
the default deployment's go under the trial key <trial>:base or <trial>:n=N,
apart from the default rows.  Cohen et al.'s PREDICT
(with abstain counted as wrong) is reported by launch/certify.py.

Transfer attacks craft adversarial examples on a source model once and classify
them with target models: ``--transfer seeds`` is the matrix over the seeds of
each configuration (every model attacked with the examples of the others, the
diagonal empty), ``--transfer-from`` names one source, a trial id or an
external ``module:function`` with ``--source-weights``; targets are the
completed trials (or those of --trial).  Rows go into data/transfer/.

Results go into the experiment's data/attack/ (one file per trial, attack and
shard; shards already written are skipped), sanity flags into data/checks/,
and the summary is printed at the end.  Attack names: see
robust/evaluation/suite.py (fgsm, pgd-N, pgd-l2-N, eot-pgd[-N], apgd-ce,
apgd-dlr, apgd-rand, black-box few-pixel-D, localsearch, localsearch-linf,
boundary, boundary-min; overrides as NAME:key=value,...; an expensive attack
takes its own cap, e.g. few-pixel-1:max_examples=100).  Everything is
validated, checkpoints included, before Ray starts; bad input exits 2.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any, Dict, List, Optional

from cluster.cli import OneLineParser, UsageError, parse_and_resolve


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="evaluate.py", description="Evaluate trained models under attacks.")
    p.add_argument("experiment", help="experiment folder or s3://bucket/prefix/<experiment>")
    p.add_argument("--trial", action="append", default=[], help="evaluate only this trial (repeatable)")
    p.add_argument("--attacks", default="fgsm,pgd-20", help="comma-separated attack names")
    p.add_argument("--protocol", default="independent", help="independent (default) or cascade")
    p.add_argument("--max-examples", type=int, help="evaluate at most this many test examples")
    p.add_argument("--eps-curve", help="attack to run at every --eps-values (robust accuracy vs eps)")
    p.add_argument("--eps-values", help="comma-separated eps values for --eps-curve")
    p.add_argument("--votes", type=int, default=10,
                   help="R: fresh draws the verdict takes per row of a stochastic model (README: robust accuracy)")
    p.add_argument("--check-examples", type=int, default=16,
                   help="per batch, examples every bounded attack attacks even in a cascade, and the EOT "
                   "check's subset (2S samples); more gives the flags more power")
    p.add_argument("--classifier", default="deployed",
                   help="deployed (default: what the defense deploys, e.g. STN's noisy classifier) or base "
                   "(the trained network alone, rows labelled 'base')")
    p.add_argument("--noisy-copies", type=int, default=1, metavar="N",
                   help="noisy copies x + r whose majority an additive-noise defense predicts (STN "
                   "Algorithm 1's n; default 1)")
    p.add_argument("--actors", type=int, help="evaluation actors (default: one per CPU, 4 per GPU)")
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--model-factory", help="module:function that returns an nn.Module (external model)")
    p.add_argument("--weights", help="state-dict file of the external model (loaded with weights_only=True)")
    p.add_argument("--dataset", help="dataset of the external model")
    p.add_argument("--transfer", choices=["seeds"], help="transfer matrix over the seeds of each configuration")
    p.add_argument("--transfer-from", metavar="TRIAL_OR_FACTORY",
                   help="transfer from one source: a trial id, or module:function with --source-weights")
    p.add_argument("--source-weights", help="state-dict file of an external --transfer-from model")
    p.add_argument("--endpoint", help="S3-compatible endpoint URL")
    p.add_argument("--address", help="Ray cluster address (default: a private local instance)")
    return p


def _attack_names(args: argparse.Namespace) -> List[str]:
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if args.eps_curve or args.eps_values:
        if not (args.eps_curve and args.eps_values):
            raise UsageError("--eps-curve and --eps-values go together")
        if args.protocol == "cascade":
            raise UsageError("--eps-curve needs --protocol independent (a cascade would only attack "
                             "the survivors of smaller eps)")
        for value in args.eps_values.split(","):
            eps = float(value)
            if eps < 0:
                raise UsageError(f"eps values must be >= 0, got {eps}")
            if eps > 0:
                names.append(f"{args.eps_curve}:eps={eps:.6g}")
    return names


def _external_source(args, storage):
    from cluster.evaluation import ModelSource
    from robust.data import dataset_names

    if not (args.weights and args.dataset):
        raise UsageError("--model-factory needs --weights FILE and --dataset NAME")
    if args.dataset not in dataset_names():
        raise UsageError(f"unknown dataset {args.dataset!r}; valid choices: {', '.join(dataset_names())}")
    with open(args.weights, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:10]
    spec = {"defense": "external", "dataset": args.dataset, "model": args.model_factory, "seed": 0,
            "defense_config": {"weights": digest}, "dataset_config": {}, "model_config": {},
            "train": {}, "attacks": [], "max_test_examples": None}
    return ModelSource(f"external-{digest}", spec, factory=args.model_factory, weights=args.weights)


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """Validate everything (attacks, trials, checkpoints) without Ray; raises UsageError."""
    from cluster.evaluation import EvalSettings, completed_sources, load_model, plan_jobs, select_trials
    from cluster.storage import Storage
    from robust.evaluation.protocol import PROTOCOLS
    from robust.evaluation.suite import parse_attacks
    from robust.spec import TrialSpec, load_splits

    if args.protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {args.protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    from cluster.evaluation import CLASSIFIERS

    if args.classifier not in CLASSIFIERS:
        raise UsageError(f"unknown classifier {args.classifier!r}; valid choices: {', '.join(CLASSIFIERS)} "
                         "(Cohen's PREDICT is reported by launch/certify.py)")
    if args.classifier != "deployed" and args.model_factory:
        raise UsageError("--classifier base: an external model is evaluated as given (it has no separate "
                         "deployment); drop --classifier")
    if (args.classifier != "deployed" or args.noisy_copies != 1) and (args.transfer or args.transfer_from):
        raise UsageError("transfer attacks classify with the deployed classifier (n = 1): drop --classifier "
                         "and --noisy-copies")
    for flag in ("max_examples", "votes", "actors", "shard_size", "batch_size", "noisy_copies"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.check_examples < 0:
        raise UsageError(f"--check-examples must be >= 0, got {args.check_examples}")
    storage = Storage(args.experiment.rstrip("/"), args.endpoint)
    root = storage.root
    if args.model_factory:
        sources = [_external_source(args, storage)]
    else:
        try:
            completed = completed_sources(storage, args.experiment)
        except ValueError as err:
            raise UsageError(f"{err} (use --model-factory for a model trained elsewhere)") from None
        try:
            sources = select_trials(completed, args.trial, args.experiment)
        except ValueError as err:
            raise UsageError(str(err)) from None
    names = _attack_names(args)
    try:
        settings = EvalSettings(attacks=tuple(names), protocol=args.protocol, votes=args.votes,
                                batch_size=args.batch_size, shard_size=args.shard_size,
                                max_examples=args.max_examples, classifier=args.classifier,
                                noisy_copies=args.noisy_copies, check_examples=args.check_examples)
    except ValueError as err:
        raise UsageError(str(err)) from None
    sizes, eps = {}, {}
    evaluated = []
    for source in sources:
        splits = load_splits(TrialSpec.from_dict(source.spec))
        specs = parse_attacks(names, splits.eps)
        try:
            model = load_model(source, storage, splits, settings.classifier, settings.noisy_copies)
        except (RuntimeError, ImportError, AttributeError, OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise UsageError(f"cannot load the model of {source.trial}: {first}") from None
        _check_noise_attacks(specs, splits.eps, model, source.trial)
        source = settings.evaluated_source(source, model)  # <trial>:base, <trial>:n=N: rows apart
        sizes[source.trial], eps[source.trial] = len(splits.test), splits.eps
        evaluated.append(source)
    sources = evaluated
    try:  # written shards that this plan cannot extend (another --shard-size) stop here, before Ray
        plan_jobs(sources, settings, storage, root, sizes, eps)
    except ValueError as err:
        raise UsageError(str(err)) from None
    transfer = _transfer_plan(args, storage, sources, completed if not args.model_factory else [])
    if transfer is not None:
        source = transfer["models"][-1]  # the external source, if any, was appended last
        if source.factory:
            splits = load_splits(TrialSpec.from_dict(source.spec))
            try:
                load_model(source, storage, splits)
            except (RuntimeError, ImportError, AttributeError, OSError, ValueError) as err:
                first = str(err).strip().splitlines()[0]
                raise UsageError(f"cannot load the source model {source.factory}: {first}") from None
    return {"storage": storage, "root": root, "sources": sources, "settings": settings, "transfer": transfer}


def _check_noise_attacks(specs, eps_data: float, model, trial: str) -> None:
    """smoothed-pgd on a classifier that already adds noise must be told that noise (never twice)."""
    from robust.attacks.smoothed_pgd import SmoothedPGD

    for spec in specs:
        attack = spec.build(eps_data, seed=0)
        if isinstance(attack, SmoothedPGD):
            try:
                attack.target(model)
            except ValueError as err:
                raise UsageError(f"trial {trial}: {err}") from None


def _transfer_plan(args: argparse.Namespace, storage, targets, trials) -> Optional[Dict[str, Any]]:
    """The transfer plan of --transfer / --transfer-from (None without them); raises UsageError."""
    from cluster.evaluation import ModelSource
    from cluster.transfer import from_source, seed_matrix

    if args.source_weights and not args.transfer_from:
        raise UsageError("--source-weights goes with --transfer-from module:function")
    if not (args.transfer or args.transfer_from):
        return None
    if args.transfer and args.transfer_from:
        raise UsageError("choose one of --transfer seeds and --transfer-from")
    if args.model_factory or args.eps_curve:
        raise UsageError("transfer attacks evaluate an experiment's trials: drop --model-factory/--eps-curve")
    models = list(targets)
    try:
        if args.transfer:
            plan = seed_matrix(models)
        elif ":" in args.transfer_from:
            if not args.source_weights:
                raise UsageError("--transfer-from module:function needs --source-weights FILE")
            with open(args.source_weights, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:10]
            spec = {**targets[0].spec, "defense": "external", "model": args.transfer_from, "seed": 0,
                    "defense_config": {"weights": digest}}
            source = ModelSource(f"external-{digest}", spec, factory=args.transfer_from,
                                 weights=args.source_weights)
            models.append(source)
            plan = from_source(source, targets)
        else:
            known = {t.trial: t for t in trials}
            if args.transfer_from not in known:
                raise UsageError(f"unknown source trial {args.transfer_from!r}; completed trials: "
                                 f"{', '.join(sorted(known))}")
            source = known[args.transfer_from]
            models = [m for m in models if m.trial != source.trial] + [source]
            plan = from_source(source, targets)
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None
    return {"plan": plan, "models": models}


def main(argv: Optional[List[str]] = None) -> int:
    args, r = parse_and_resolve(build_parser(), resolve, argv)

    from cluster.experiment import evaluate_sources, init_ray
    from cluster.records import write_trial_row
    from robust.spec import TrialSpec

    for source in r["sources"]:
        if source.factory:  # an external model gets a trials row, so the summary lists it
            write_trial_row(r["storage"], r["root"], source.trial, TrialSpec.from_dict(source.spec),
                            "completed", checkpoint=source.weights)
    init_ray(args.address)
    if r["transfer"] is not None:
        import ray

        from cluster.experiment import evaluation_actors
        from cluster.transfer import run_transfer

        n_actors, gpus = evaluation_actors(ray.cluster_resources())
        done = run_transfer(r["transfer"]["plan"], r["transfer"]["models"], r["settings"], r["storage"],
                            r["root"], actors=args.actors or n_actors, gpus_per_actor=gpus)
        print(f"crafted {done} source example(s) and classified them with every target; results in "
              f"{r['storage'].display(r['root'])}/data/transfer")
        import summarize

        return summarize.show(args.experiment, args.endpoint)
    done = evaluate_sources(r["sources"], r["settings"], r["storage"], r["root"], actors=args.actors)
    print(f"evaluated {done} example(s) x model(s); results in {r['storage'].display(r['root'])}")
    import summarize

    return summarize.show(args.experiment, args.endpoint)


if __name__ == "__main__":
    sys.exit(main())
