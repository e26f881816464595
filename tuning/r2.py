"""Search space of `r2` (Tibo et al., eqs. 7 and 12): lambda (``lam``) in {0.01, 0.1, 1}.

The paper tunes lambda and reports the value whose test accuracy is closest to
unregularised training (section 6); it gives no grid.  The smoke space is
lam in {0.01, 0.1}.  Metric: PGD accuracy on the validation split (the loop's
robustness metric; the R2 score itself is computed after training by
launch/score.py).
"""
from ray import tune

METRIC = "val_pgd_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {"lam": tune.choice([0.01, 0.1, 1.0])}


def smoke_space(eps_data: float) -> dict:
    return {"lam": tune.choice([0.01, 0.1])}
