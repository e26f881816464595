"""Search space of `constant` (constant random perturbations).

Full space (issue #2, following the paper's ablations A.2-A.4): bound b in
{0.5, 1, 1.5, 2} * 2 * eps_data (CIFAR-10: {8, 16, 24, 32}/255), K in
{1, 5, 10, 20}, distribution uniform or Gaussian.  The smoke space is the
documented subset b in {1, 2} * 2 * eps_data, K in {1, 5}, uniform: small
enough for a laptop, wide enough that selection matters.
Metric: PGD accuracy on the validation split.
"""
from ray import tune

METRIC = "val_pgd_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {
        "bound": tune.choice([f * 2 * eps_data for f in (0.5, 1.0, 1.5, 2.0)]),
        "copies": tune.choice([1, 5, 10, 20]),
        "distribution": tune.choice(["uniform", "gaussian"]),
    }


def smoke_space(eps_data: float) -> dict:
    return {
        "bound": tune.choice([f * 2 * eps_data for f in (1.0, 2.0)]),
        "copies": tune.choice([1, 5]),
        "distribution": "uniform",
    }
