"""Search space of `stn` (stability training with noise, Li et al. 2019).

Full space: noise scale sigma in {0.12, 0.25, 100/255, 0.5, 0.7, 1.0} (covers
the paper's CIFAR-10 and MNIST values, 100/255 and 0.7, section 6.2; Figure 1
shows sigma trades clean accuracy against the largest certifiable radius),
stability weight gamma in {0.5, 1, 2, 4} (the paper gives no value), noise
Gaussian (L2 certificate, Theorem 2) or Laplace (L1 certificate, Theorem 3).
sigma does not scale with eps_data: it sets the scale of the certified radius,
not of the L-inf attack budget.  The smoke space is sigma in {0.25, 0.5} x
gamma in {0.5, 1}, Gaussian.

Metric: ``val_certified_acc``, the certified accuracy (Algorithm 1) at a fixed
radius on the validation split, reported by the certification code, not by the
training loop.  Caveat: a Gaussian trial is certified in L2 and a Laplace trial
in L1, so the metric compares the two noise types only if the certification
reports both at comparable radii; restrict ``noise`` to one value otherwise.
"""
from ray import tune

METRIC = "val_certified_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {
        "sigma": tune.choice([0.12, 0.25, 100 / 255, 0.5, 0.7, 1.0]),
        "gamma": tune.choice([0.5, 1.0, 2.0, 4.0]),
        "noise": tune.choice(["gaussian", "laplace"]),
    }


def smoke_space(eps_data: float) -> dict:
    return {
        "sigma": tune.choice([0.25, 0.5]),
        "gamma": tune.choice([0.5, 1.0]),
        "noise": "gaussian",
    }
