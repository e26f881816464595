"""Search space of `r4` (Tibo et al., sections 3.2 and 7): lambda (``lam``) in {0.1, 1, 10}
and the autoencoder's code noise ``sigma`` in {0.03, 0.06, 0.12} (0.06 is the paper's,
section 7).  The smoke space is lam in {0.1, 1} at sigma = 0.06.  Metric: clean accuracy on
the validation split: R4 targets generalisation under the data distribution, and section 7
compares R4 training by its accuracy (Tables 4 and 5).
"""
from ray import tune

METRIC = "val_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {"lam": tune.choice([0.1, 1.0, 10.0]), "sigma": tune.choice([0.03, 0.06, 0.12])}


def smoke_space(eps_data: float) -> dict:
    return {"lam": tune.choice([0.1, 1.0]), "sigma": 0.06}
