"""Defenses: the contract every registered defense meets through the Ray-free loop,
and the properties of constant perturbations that the paper's method relies on."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import quick_config, small_model
from torch.utils.data import DistributedSampler

from robust.data import create_dataset
from robust.defenses import create_defense, defense_names
from robust.defenses.constant import PerturbedSplit, perturbation
from robust.registry import UnknownNameError
from robust.train import NonFiniteLoss, fit

CPU = torch.device("cpu")
_model = small_model
_cfg = quick_config


@pytest.fixture(scope="module")
def synthetic():
    return create_dataset("synthetic")




@pytest.mark.parametrize("name", defense_names())
def test_every_defense_trains_through_the_single_loop(name, synthetic):
    """One epoch: finite loss, every parameter updated, metrics for selection present."""
    model = _model(synthetic)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    defense = create_defense(name, eps_data=synthetic.eps)
    module, history = fit(model, defense, synthetic, _cfg(), seed=0, device=CPU)
    row = history[-1]
    assert math.isfinite(row["train_loss"])
    assert 0.0 <= row["val_acc"] <= 1.0 and 0.0 <= row["val_pgd_acc"] <= 1.0
    changed = [k for k, v in module.state_dict().items() if v.dtype.is_floating_point
               and (k not in before or not torch.equal(v, before[k])) and "normalize" not in k]
    # (parameters a defense adds in prepare_model, e.g. stochastic-weight sigmas, are new)
    params = [k for k, _ in module.named_parameters()]
    assert set(params) <= set(changed)
    assert row["train_acc"] > 0.3  # the synthetic classes are easy: training learned something


def test_unknown_defense_names_the_valid_choices():
    with pytest.raises(UnknownNameError, match="valid choices: .*constant"):
        create_defense("nope")


@pytest.mark.parametrize("bad", [{"bound": 0.0}, {"bound": -0.1}, {"copies": 0}, {"copies": 1.5},
                                 {"distribution": "cauchy"}])
def test_constant_rejects_invalid_settings(bad):
    with pytest.raises(ValueError):
        create_defense("constant", eps_data=8 / 255, **bad)


def test_constant_paper_defaults_follow_the_paper():
    """K = 10, uniform, clean kept, b = 2 * eps_data (A.1): 16/255 on CIFAR-10."""
    cfg = create_defense("constant", eps_data=8 / 255).config
    assert (cfg.copies, cfg.distribution, cfg.keep_clean) == (10, "uniform", True)
    assert cfg.bound == pytest.approx(16 / 255)


def _all_items(ds, positions):
    return {int(p): ds[int(p)] for p in positions}


def test_constant_perturbations_do_not_depend_on_worker_order_or_count(synthetic):
    """Item n is the same tensor whichever rank, order and number of replicas produced it."""
    ds = PerturbedSplit(synthetic.train, copies=3, bound=0.2, distribution="uniform",
                        keep_clean=True, seed=7)
    reference = {n: ds[n][0] for n in range(len(ds))}
    for replicas in (1, 2, 3):
        seen = {}
        for rank in range(replicas):
            sampler = DistributedSampler(ds, num_replicas=replicas, rank=rank, shuffle=True, seed=rank + 5)
            for n in reversed(list(sampler)):  # any order
                seen[n] = ds[n][0]
        for n, image in seen.items():
            assert torch.equal(image, reference[n])
    fresh = PerturbedSplit(synthetic.train, 3, 0.2, "uniform", True, seed=7)  # a new process's object
    assert all(torch.equal(fresh[n][0], reference[n]) for n in range(0, len(ds), 37))


def test_constant_perturbations_are_fixed_across_epochs_and_variable_ones_are_not(synthetic):
    const = PerturbedSplit(synthetic.train, 2, 0.2, "uniform", False, seed=1)
    var = PerturbedSplit(synthetic.train, 2, 0.2, "uniform", False, seed=1, fresh_each_epoch=True)
    first_c, first_v = const[5][0], var[5][0]
    const.set_epoch(2)
    var.set_epoch(2)
    assert torch.equal(const[5][0], first_c)
    assert not torch.equal(var[5][0], first_v)


def test_uniform_perturbations_lie_in_the_bound_and_differ_by_coordinates():
    deltas = {(s, i, j): perturbation(s, i, j, (1, 8, 8), 0.1, "uniform")
              for s in (0, 1) for i in (0, 1, 2) for j in (1, 2, 3)}
    for d in deltas.values():
        assert d.abs().max().item() <= 0.1
        assert d.abs().max().item() > 0.05  # they actually use the ball
    values = list(deltas.values())
    for a in range(len(values)):
        for b in range(a + 1, len(values)):
            assert not torch.equal(values[a], values[b])
    # a pure function: the same coordinates give the same tensor
    assert torch.equal(perturbation(0, 2, 3, (1, 8, 8), 0.1, "uniform"), deltas[(0, 2, 3)])


def test_gaussian_perturbations_have_std_b():
    d = perturbation(3, 11, 1, (200000,), 0.05, "gaussian")
    assert d.std().item() == pytest.approx(0.05, rel=0.02)
    assert d.mean().item() == pytest.approx(0.0, abs=0.002)


def test_extended_set_size_clean_copies_and_clipping(synthetic):
    split = synthetic.train
    kept = PerturbedSplit(split, 4, 0.5, "uniform", keep_clean=True, seed=0)
    dropped = PerturbedSplit(split, 4, 0.5, "uniform", keep_clean=False, seed=0)
    m = len(split)
    assert len(kept) == 5 * m and len(dropped) == 4 * m
    assert torch.equal(kept[3][0], split[3][0])              # copy 0 is the clean image
    assert torch.equal(kept[m + 3][0], dropped[3][0])        # perturbation j=1 in both
    assert torch.equal(kept[m + 3][2], split[3][2])          # same example index
    x, _, _ = kept.batch(torch.arange(len(kept)))
    assert x.min().item() >= 0.0 and x.max().item() <= 1.0   # clipped to the image box
    clean = split.batch(torch.arange(m))[0]
    assert ((dropped.batch(torch.arange(m))[0] - clean).abs().max().item()) <= 0.5 + 1e-6


def test_training_set_of_constant_defense_is_extended(synthetic):
    defense = create_defense("constant", eps_data=synthetic.eps, copies=3)
    assert len(defense.train_dataset(synthetic.train, seed=0)) == 4 * len(synthetic.train)


def test_nan_loss_stops_training_with_the_reason(synthetic):
    model = _model(synthetic)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="non-finite at epoch 1"):
        fit(model, create_defense("standard"), synthetic, _cfg(), seed=0, device=CPU)


def test_resumed_training_equals_uninterrupted_training(synthetic):
    """Stop after epoch 1, resume from its checkpoint: epoch 2 repeats nothing and loses nothing."""
    cfg = _cfg(epochs=2, schedule="multistep", milestones=[0.5])
    defense = lambda: create_defense("constant", eps_data=synthetic.eps, copies=2)  # noqa: E731
    full, history = fit(_model(synthetic), defense(), synthetic, cfg, seed=3, device=CPU)

    states = []
    fit(_model(synthetic), defense(), synthetic, _cfg(epochs=2, schedule="multistep", milestones=[0.5]),
        seed=3, device=CPU, on_epoch_end=lambda m, state_fn: states.append(state_fn()))
    from robust.train import TrainState

    first = TrainState(**states[0])
    assert first.epoch == 1
    resumed, resumed_history = fit(_model(synthetic, seed=99), defense(), synthetic, cfg, seed=3,
                                   device=CPU, resume=first)
    assert [h["epoch"] for h in resumed_history] == [1, 2]
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v)
    assert resumed_history[-1]["train_loss"] == pytest.approx(history[-1]["train_loss"])
