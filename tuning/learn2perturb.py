"""Search space of `learn2perturb` (Jeddi et al. 2020), the axes the issue names.

Full space: regulariser weight gamma log-uniform in [1e-5, 1e-3] around the
paper's 1e-4 (A.4); initial scale theta_0 in {0.05, 0.1, 0.25, 0.5} and lower bound
theta_min in {0.001, 0.01, 0.05} (Algorithm 1 names both, the paper gives no
value; 0.25 (the paper preset, from the authors' code) and 0.01); warm-up epochs in {0, 10, 20} (20 in
section 3.3); clean/adversarial weights (alpha, beta) of equation 11 in
{0.3, 0.5, 0.7} each, drawn independently (0.5 and 0.5 in the paper; their
sum also scales the step, as a learning rate would).  The smoke space is
gamma in {1e-4, 1e-3} x warm-up in {0, 1} (runs of 2 epochs or more).

Metric: ``val_eot_pgd_acc``, accuracy under EOT-PGD on the validation split
(the defense is randomized: a plain PGD metric would rank trials by gradient
noise; the paper's EOT evaluation is section 4.5).
"""
from ray import tune

METRIC = "val_eot_pgd_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {
        "gamma": tune.loguniform(1e-5, 1e-3),
        "theta_init": tune.choice([0.05, 0.1, 0.25, 0.5]),
        "theta_min": tune.choice([0.001, 0.01, 0.05]),
        "warmup_epochs": tune.choice([0, 10, 20]),
        "alpha": tune.choice([0.3, 0.5, 0.7]),
        "beta": tune.choice([0.3, 0.5, 0.7]),
    }


def smoke_space(eps_data: float) -> dict:
    return {
        "gamma": tune.choice([1e-4, 1e-3]),
        "warmup_epochs": tune.choice([0, 1]),
    }
