"""Search space of `trades` (Zhang et al. 2019): the trade-off beta = 1/lambda in
{1, 3, 6} (6 is their CIFAR-10 setting; smaller beta favours clean accuracy).
The smoke space is beta in {1, 6}.  Metric: PGD accuracy on the validation split."""
from ray import tune

METRIC = "val_pgd_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {"beta": tune.choice([1.0, 3.0, 6.0])}


def smoke_space(eps_data: float) -> dict:
    return {"beta": tune.choice([1.0, 6.0])}
