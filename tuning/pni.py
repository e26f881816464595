"""Search space of `pni` (PNI-W, He et al. 2019).

Full space: scale granularity per layer (PNI's default), channel or element;
initial scale in {0.1, 0.25 (PNI), 0.5}; clean/adversarial loss weights alpha,
beta in {0.3, 0.5, 0.7} each (0.5 and 0.5 in PNI).  The smoke space is the
granularity in {layer, channel}.  Metric: ``val_eot_pgd_acc``, EOT-PGD accuracy
on the validation split, as for Learn2Perturb, so the two rank alike.
"""
from ray import tune

METRIC = "val_eot_pgd_acc"
MODE = "max"


def space(eps_data: float) -> dict:
    return {
        "granularity": tune.choice(["layer", "channel", "element"]),
        "scale_init": tune.choice([0.1, 0.25, 0.5]),
        "alpha": tune.choice([0.3, 0.5, 0.7]),
        "beta": tune.choice([0.3, 0.5, 0.7]),
    }


def smoke_space(eps_data: float) -> dict:
    return {"granularity": tune.choice(["layer", "channel"])}
