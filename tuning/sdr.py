"""Search space of `sdr` (stochastic weights, Khan et al.; robust/defenses/sdr.py).

The paper tunes nothing it reports; the issue asks for these axes:

* SDR-Decay (Algorithm 2): beta (sigma += beta*|grad|) in {0.01, 0.05, 0.1, 0.2},
  zeta (sigma *= zeta) in {0.5, 0.7, 0.9, 0.99}, tau (decay every tau steps) in
  {10, 100, 500} (Frazier-Logue & Hanson's example runs use beta 0.02-0.2 and
  zeta 0.5-0.9999).
* SDR-Learnable (section 4.3): the threshold schedule, increment in {0.02, 0.05,
  0.1} (paper: 0.05), patience in {2, 3, 5} epochs, and the starting bounds
  sigma_min in {0.0, 0.05, 0.1} (paper: 0.0), sigma_max in {0.5, 1.0} (paper: 1.0).

Both variants are one space with ``variant`` as an axis; the keys of the other
variant are inert (decay ignores the schedule unless ``schedule=True``,
learnable ignores beta/zeta/tau).  Fix the variant with ``--set variant=decay``
to search one of them.  Smoke space: the two variants at the paper's bounds.

Metric: ``val_eot_pgd_acc``, PGD with EOT over weight draws on the validation
split (see the defense): plain PGD follows one draw per step and overstates the
robustness of stochastic weights.
"""
from ray import tune

METRIC = "val_eot_pgd_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {
        "variant": tune.choice(["decay", "learnable"]),
        "beta": tune.choice([0.01, 0.05, 0.1, 0.2]),
        "zeta": tune.choice([0.5, 0.7, 0.9, 0.99]),
        "tau": tune.choice([10, 100, 500]),
        "increment": tune.choice([0.02, 0.05, 0.1]),
        "patience": tune.choice([2, 3, 5]),
        "sigma_min": tune.choice([0.0, 0.05, 0.1]),
        "sigma_max": tune.choice([0.5, 1.0]),
    }


def smoke_space(eps_data: float) -> dict:
    return {"variant": tune.choice(["decay", "learnable"])}
