"""Attacks: threat-model membership, strength ordering, EOT equivalences."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robust.attacks import attack_names, create_attack
from robust.attacks.base import GradientAttack
from robust.registry import UnknownNameError


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def batch(digits):
    x, y, _ = digits.test.batch(torch.arange(len(digits.test)))
    return x, y


def _eps_in_band(model, x, y):
    """The smallest eps on a grid at which FGSM accuracy falls in [20%, 80%]."""
    for eps in (0.05, 0.075, 0.1, 0.15, 0.2, 0.3):
        acc = _accuracy(model, create_attack("fgsm", eps=eps)(model, x, y), y)
        if 0.2 <= acc <= 0.8:
            return eps, acc
    pytest.fail("no eps on the grid puts FGSM accuracy between 20% and 80%")


def test_pgd_stays_in_ball_and_beats_fgsm(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    eps, fgsm_acc = _eps_in_band(model, x, y)
    x_adv = create_attack("pgd", eps=eps, steps=20, step_size=eps / 4, seed=0)(model, x, y)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    pgd_acc = _accuracy(model, x_adv, y)
    assert pgd_acc < fgsm_acc, (pgd_acc, fgsm_acc)


def test_fgsm_moves_every_pixel_by_eps_or_hits_the_box(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    x_adv = create_attack("fgsm", eps=0.1)(model, x[:32], y[:32])
    moved = (x_adv - x[:32]).abs()
    at_box = (x_adv == 0) | (x_adv == 1)
    grad_zero = moved == 0
    assert bool((((moved - 0.1).abs() < 1e-6) | at_box | grad_zero).all())


def test_eot_with_one_sample_is_the_plain_gradient(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:16], y[:16]
    plain = GradientAttack(eot_samples=1).input_gradient(model, x, y)
    xr = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(xr), y, reduction="sum").backward()
    torch.testing.assert_close(plain, xr.grad)


@pytest.mark.parametrize("chunk", [None, 16, 40, 1000])
def test_eot_average_is_independent_of_chunking(trained_digits_model, batch, chunk):
    """On a deterministic model the mean over S passes equals one pass, however chunked."""
    model, (x, y) = trained_digits_model, batch
    x, y = x[:8], y[:8]
    one = GradientAttack(eot_samples=1).input_gradient(model, x, y)
    many = GradientAttack(eot_samples=5, eot_chunk=chunk).input_gradient(model, x, y)
    torch.testing.assert_close(many, one, rtol=1e-4, atol=1e-6)


def test_eot_averages_over_stochastic_passes():
    """With a noisy model the EOT gradient is the mean of the per-pass gradients."""

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, 2))
            self.draws = iter(torch.linspace(0.5, 2.0, 10).tolist())

        def forward(self, x):
            # One scale per forward pass: the gradient of each pass differs.
            return x.flatten(1) @ self.w * next(self.draws)

    x, y = torch.full((3, 1, 2, 2), 0.5), torch.tensor([0, 1, 0])
    model = Noisy()
    got = GradientAttack(eot_samples=4, eot_chunk=3).input_gradient(model, x, y)  # 4 passes of 1 copy
    scales = torch.linspace(0.5, 2.0, 10)[:4]
    expected = torch.zeros_like(x)
    for s in scales:
        xr = x.clone().requires_grad_(True)
        nn.functional.cross_entropy(xr.flatten(1) @ torch.ones(4, 2) * s, y, reduction="sum").backward()
        expected += xr.grad / 4
    torch.testing.assert_close(got, expected)


def test_attack_rejects_inputs_outside_the_unit_box(trained_digits_model):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        create_attack("fgsm", eps=0.1)(trained_digits_model, torch.full((1, 1, 8, 8), 2.0), torch.tensor([0]))


def test_attack_restores_training_mode(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    model.train()
    create_attack("pgd", eps=0.1, steps=2)(model, x[:4], y[:4])
    assert model.training
    model.eval()


def test_registry_lists_valid_attacks():
    assert {"fgsm", "pgd"} <= set(attack_names())
    with pytest.raises(UnknownNameError, match="valid choices: .*fgsm"):
        create_attack("nope", eps=0.1)
