"""Search space of `pgd-at`: the number of PGD steps in training (Madry et al. use 7)
and the step size as a fraction of eps.  Metric: PGD accuracy on the validation split."""
from ray import tune

METRIC = "val_pgd_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {"steps": tune.choice([3, 7, 10]),
            "step_size": tune.choice([eps_data / 4, eps_data / 2])}


def smoke_space(eps_data: float) -> dict:
    return {"steps": tune.choice([3, 7])}
