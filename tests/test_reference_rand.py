"""Our `apgd-rand` is at least as strong as a reference implementation of the rand protocol.

The reference is torchattacks' APGD with EOT (loss 'ce' and 'dlr', ``eot_iter``
= S, one restart), installed for the tests only; both sides' points are judged
by the verdict on the same seeded draws (``tests/rand_reference.py`` states the
rule).  Models: the `pni` defense (weight noise shared by a pass's examples) and
an external model with per-example input noise.  CI size: 32 examples, 25 steps
and S = 10 on both sides (the full 100 steps x S = 20 on 256 examples is
``benchmarks/bench_rand_reference.py``).
"""
from __future__ import annotations

import pytest
import torch

from helpers import NoisyInput
from rand_reference import INPUT_NOISE_SIGMA, REFERENCE_VERSION, Side, compare, robust_scores, train_pni
from robust.evaluation.protocol import is_stochastic

pytest.importorskip(
    "torchattacks", reason=f"the reference implementation is not installed "
                           f"(pip install --no-deps torchattacks=={REFERENCE_VERSION})")

EXAMPLES, STEPS, EOT_SAMPLES, VOTES = 32, 25, 10, 20


# 8x8 inputs gain nothing from a second thread; on a shared 2-core machine two spinning
# OpenMP threads made this module 6x slower (134 s against 21 s at load ~4).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pni_model(digits, trained_digits_model):
    """PNI-W trained one epoch (PGD-3 mixed loss) from the shared standard model's weights."""
    return train_pni(digits, epochs=1, init=trained_digits_model)


@pytest.fixture(scope="module", params=["pni", "per-example-noise"])
def comparison(request, digits, trained_digits_model):
    if request.param == "pni":
        model = request.getfixturevalue("pni_model")
    else:
        model = NoisyInput(trained_digits_model, INPUT_NOISE_SIGMA).eval()
    x, y, _ = digits.test.batch(torch.arange(EXAMPLES))
    assert is_stochastic(model, x)
    return model, x, y, compare(model, x, y, digits.eps, votes=VOTES, steps=STEPS, eot_samples=EOT_SAMPLES)


def test_both_sides_stay_in_the_eps_ball(comparison, digits):
    _, x, _, c = comparison
    for side in (c.ours, c.reference):
        for points in side.points:
            assert points.shape == x.shape
            assert float((points - x).abs().max()) <= digits.eps + 1e-6
            assert float(points.min()) >= 0.0 and float(points.max()) <= 1.0


def test_apgd_rand_is_at_least_as_strong_as_the_reference(comparison):
    """Robust accuracy (mean of min(clean, APGD-CE, APGD-DLR) scores over the same verdict
    draws) of ours is not above the reference's beyond the paired 95% interval, in a regime
    where attacks can be told apart (robust accuracy well above 0 and well below clean)."""
    _, _, _, c = comparison
    assert c.clean >= 0.8, c.clean
    assert 0.1 <= c.reference.accuracy <= c.clean - 0.1, (c.reference.accuracy, c.clean)
    low, high = c.difference_interval()
    assert c.ours_at_least_as_strong, (f"ours {c.ours.accuracy:.3f} vs torchattacks {c.reference.accuracy:.3f}: "
                                       f"paired difference interval [{low:.3f}, {high:.3f}] lies above 0")


def test_the_comparison_rejects_a_side_that_does_not_attack(comparison):
    """Positive control of the decision rule: the clean inputs offered as "our" points, judged
    on the same draws, are found weaker than the reference (the interval lies above 0)."""
    model, x, y, c = comparison
    with torch.random.fork_rng():
        unattacked = robust_scores(model, x, y, [x, x], VOTES, seed=0)
    control = c.with_ours(Side([x, x], unattacked, 0.0))
    assert not control.ours_at_least_as_strong, control.difference_interval()
