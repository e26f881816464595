"""Auto-PGD (Croce & Hein 2020): threat model, strength, DLR loss, checkpoints, EOT, determinism."""
from __future__ import annotations

import pytest
import torch
from helpers import fgsm_band_eps

from robust.attacks import attack_names, create_attack
from robust.attacks.apgd import APGD, checkpoints, dlr_loss


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def batch(digits):
    x, y, _ = digits.test.batch(torch.arange(128))
    return x, y


@pytest.fixture(scope="module")
def eps_in_band(trained_digits_model, batch):
    """The smallest eps on a grid at which FGSM accuracy falls in [20%, 80%]."""
    eps = fgsm_band_eps(trained_digits_model, *batch)
    if eps is None:
        pytest.fail("no eps on the grid puts FGSM accuracy between 20% and 80%")
    return eps


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_apgd_stays_in_its_ball_and_the_unit_box(trained_digits_model, batch, name, norm, eps):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:32], y[:32]
    x_adv = create_attack(name, eps=eps, norm=norm, steps=5, restarts=2)(model, x, y)
    assert x_adv.shape == x.shape
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max().item() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max().item() <= eps + 1e-5


def test_apgd_ce_is_at_least_as_strong_as_pgd_and_dlr_breaks_examples(trained_digits_model, batch,
                                                                        eps_in_band):
    model, (x, y), eps = trained_digits_model, batch, eps_in_band
    pgd_acc = _accuracy(model, create_attack("pgd", eps=eps, steps=20, step_size=eps / 4)(model, x, y), y)
    apgd_acc = _accuracy(model, create_attack("apgd-ce", eps=eps, steps=20)(model, x, y), y)
    assert apgd_acc <= pgd_acc, (apgd_acc, pgd_acc)
    dlr_acc = _accuracy(model, create_attack("apgd-dlr", eps=eps, steps=20)(model, x, y), y)
    assert dlr_acc < _accuracy(model, x, y)


def test_dlr_matches_a_hand_computed_value():
    logits = torch.tensor([[3.0, 1.0, 0.5, 2.0], [3.0, 1.0, 0.5, 2.0]])
    # Sorted: 3, 2, 1, 0.5 so z_pi1 - z_pi3 = 2.  y=0: -(3 - 2)/2; y=2: -(0.5 - 3)/2.
    torch.testing.assert_close(dlr_loss(logits, torch.tensor([0, 2])), torch.tensor([-0.5, 1.25]))


def test_dlr_is_invariant_to_shifting_and_positive_scaling():
    logits, y = torch.randn(32, 10, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 10
    base = dlr_loss(logits, y)
    torch.testing.assert_close(dlr_loss(logits + 7.5, y), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dlr_loss(logits * 13.0, y), base, rtol=1e-5, atol=1e-5)


def test_dlr_needs_three_classes():
    with pytest.raises(ValueError, match="K >= 3"):
        dlr_loss(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))


def test_checkpoints_follow_the_paper_schedule():
    w = checkpoints(100)
    assert w[:2] == [0, 22] and w[-1] <= 100
    gaps = [b - a for a, b in zip(w, w[1:])]
    assert all(g > 0 for g in gaps)
    assert all(g >= 5 for g in gaps)  # p_{j+1} - p_j >= 0.06, less ceil effects
    assert all(checkpoints(n) == sorted(set(checkpoints(n))) for n in range(1, 30))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eot_with_one_sample_is_the_plain_attack(trained_digits_model, batch, norm):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:32], y[:32]
    plain = APGD(eps=0.1, norm=norm, steps=8)(model, x, y)
    explicit = APGD(eps=0.1, norm=norm, steps=8, eot_samples=1, eot_chunk=1)(model, x, y)
    assert torch.equal(plain, explicit)


def test_eot_result_does_not_depend_on_chunking(trained_digits_model, batch):
    """On a deterministic model, stacking the S passes or running them one by one agrees."""
    model, (x, y) = trained_digits_model, batch
    x, y = x[:16], y[:16]
    stacked = APGD(eps=0.1, steps=8, eot_samples=3, eot_chunk=None)(model, x, y)
    one_by_one = APGD(eps=0.1, steps=8, eot_samples=3, eot_chunk=1)(model, x, y)
    torch.testing.assert_close(stacked, one_by_one, rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr"])
def test_same_seed_same_result(trained_digits_model, batch, name):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:32], y[:32]
    runs = [create_attack(name, eps=0.1, steps=8, restarts=2, seed=3)(model, x, y) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "hinge"}, "valid choices: ce, dlr"),
    ({"norm": "l1"}, "valid choices: linf, l2"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"steps": 0}, "steps and restarts"),
    ({"restarts": 0}, "steps and restarts"),
])
def test_invalid_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        APGD(**{"eps": 0.1, **kwargs})


def test_registry_lists_apgd():
    assert {"apgd-ce", "apgd-dlr"} <= set(attack_names())


def test_restarts_never_undo_a_broken_example(trained_digits_model, batch, eps_in_band):
    """Restart 1 is the same run with either setting, and later restarts only add broken examples."""
    model, (x, y), eps = trained_digits_model, batch, eps_in_band
    x, y = x[:64], y[:64]
    once = create_attack("apgd-ce", eps=eps, steps=5, restarts=1)(model, x, y)
    thrice = create_attack("apgd-ce", eps=eps, steps=5, restarts=3)(model, x, y)
    with torch.no_grad():
        broken_once, broken_thrice = model(once).argmax(1) != y, model(thrice).argmax(1) != y
    assert bool((broken_thrice | ~broken_once).all())
