"""Search space of `dropconnect` (the SDR paper's baseline, Table 1: p = 0.2).

Full space: drop probability p in {0.1, 0.2, 0.3, 0.5} (Wan et al. 2013 use 0.5
on fully connected layers), one mask per batch or per example.  Smoke space:
p in {0.2, 0.5}.  Metric: ``val_eot_pgd_acc`` (EOT-PGD on the validation split,
as for `sdr`: the masks are drawn at inference too).
"""
from ray import tune

METRIC = "val_eot_pgd_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {"p": tune.choice([0.1, 0.2, 0.3, 0.5]), "per_example": tune.choice([False, True])}


def smoke_space(eps_data: float) -> dict:
    return {"p": tune.choice([0.2, 0.5])}
