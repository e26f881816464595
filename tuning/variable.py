"""Search space of `variable` (Table 9 B-E of the constant-perturbation paper):
distribution and whether the clean examples are kept, bound around 2 * eps_data.
Metric: PGD accuracy on the validation split."""
from ray import tune

METRIC = "val_pgd_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {
        "bound": tune.choice([f * 2 * eps_data for f in (0.5, 1.0, 1.5, 2.0)]),
        "distribution": tune.choice(["uniform", "gaussian"]),
        "keep_clean": tune.choice([True, False]),
    }


def smoke_space(eps_data: float) -> dict:
    return {"bound": 2 * eps_data, "distribution": tune.choice(["uniform", "gaussian"]),
            "keep_clean": tune.choice([True, False])}
