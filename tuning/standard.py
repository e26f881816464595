"""`standard` has no defense hyperparameters: its trials differ only by seed.
Metric: PGD accuracy on the validation split (reported for comparison)."""
METRIC = "val_pgd_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {}


def smoke_space(eps_data: float) -> dict:
    return {}
