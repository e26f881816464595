"""Certification: the bounds match the papers, the confidence bounds are exact, certificates
hold at their confidence (also with early stopping, and fail without its correction),
and sharded noise counts add up to the unsharded ones."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from robust.certify import (
    ABSTAIN,
    CERTIFY_PRESETS,
    Certificate,
    Smooth,
    certified_accuracy,
    certify_from_counts,
    cohen_l2_radius,
    laplace_l1_radius,
    lower_bound,
    pixeldp_l2_radius,
    predict_from_counts,
    renyi_divergence_term,
    renyi_l2_radius,
    upper_bound,
)
from robust.certify import smooth as smooth_module
from robust.evaluation.stats import clopper_pearson

# Probabilities including the edges and values close to them.
EDGE_GRID = np.unique(np.concatenate([[0.0, 1e-300, 1e-12, 1e-6], np.linspace(0, 1, 41), [1 - 1e-6, 1 - 1e-12, 1.0]]))

PAIR_BOUNDS = {
    "renyi": renyi_l2_radius,
    "laplace": laplace_l1_radius,
    "pixeldp": pixeldp_l2_radius,
    "cohen": lambda p1, p2, sigma: np.where(p1 > p2, cohen_l2_radius(p1, sigma), 0.0),
}


def brute_force_renyi(p1: float, p2: float, sigma: float) -> float:
    """Algorithm 1 step 6 written out with plain float64 powers over a dense grid of orders.

    Orders up to 101 only: beyond, p^(1 - a) overflows for the p used here.
    """
    a = 1.0 + np.logspace(-5, 2, 200_001)
    inner = 1 - p1 - p2 + 2 * ((p1 ** (1 - a) + p2 ** (1 - a)) / 2) ** (1 / (1 - a))
    return float(np.sqrt(np.max(-(2 * sigma**2 / a) * np.log(inner))))


def renyi_divergence(q: np.ndarray, p: np.ndarray, order: float) -> float:
    """D_order(Q || P) of two multinomials (STN Definition 1)."""
    return float(np.log(np.sum(q**order * p ** (1 - order))) / (order - 1))


# --- bounds -------------------------------------------------------------------------------


def test_cohen_radius_is_sigma_times_normal_quantile():
    assert cohen_l2_radius(0.9, 0.5) == pytest.approx(0.5 * 1.2815515655446004, rel=1e-12)
    assert cohen_l2_radius(0.975, 2.0) == pytest.approx(2.0 * 1.959963984540054, rel=1e-12)
    assert cohen_l2_radius(0.5, 1.0) == 0.0 and cohen_l2_radius(0.3, 1.0) == 0.0
    assert cohen_l2_radius(1.0, 1.0) == math.inf


def test_laplace_radius_binary_case():
    # Theorem 3 with p2 = 1 - p1: -lambda log(2 - 2 p1).
    for p1 in (0.55, 0.8, 0.99):
        assert laplace_l1_radius(p1, 1 - p1, 0.5) == pytest.approx(-0.5 * math.log(2 - 2 * p1), rel=1e-12)
    assert laplace_l1_radius(1.0, 0.0, 0.5) == math.inf


@pytest.mark.parametrize("p1, p2", [(0.9, 0.1), (0.7, 0.3), (0.99, 0.01), (0.6, 0.2), (0.5, 0.1), (0.4, 0.35)])
def test_renyi_radius_matches_brute_force_over_orders(p1, p2):
    ours, brute = renyi_l2_radius(p1, p2, 0.7), brute_force_renyi(p1, p2, 0.7)
    assert ours >= brute * (1 - 1e-9)  # at least as good as the dense grid ...
    assert ours <= brute * (1 + 1e-5)  # ... and not beyond the supremum it approximates


def test_renyi_radius_at_p2_zero_is_the_order_one_limit():
    # The term is -log(1 - p1) for every order, so the supremum is the limit a -> 1.
    p1 = np.array([0.3, 0.9, 1 - 1e-9])
    expected = 0.5 * np.sqrt(-2 * np.log1p(-p1))
    np.testing.assert_allclose(renyi_l2_radius(p1, 0.0, 0.5), expected, rtol=1e-6)


def test_renyi_beats_pixeldp_and_cohen_beats_renyi_in_the_binary_case():
    # STN appendix A (Figure 5): the Renyi bound is strictly higher than PixelDP's wherever the
    # latter certifies; STN section 7: Cohen et al.'s bound is tighter with two classes.
    p1, p2 = np.meshgrid(np.linspace(0, 1, 61), np.linspace(0, 1, 61), indexing="ij")
    valid = (p1 >= p2) & (p1 + p2 <= 1) & (p1 + p2 >= 0.2)
    renyi, pixeldp = renyi_l2_radius(p1[valid], p2[valid], 1.0), pixeldp_l2_radius(p1[valid], p2[valid], 1.0)
    assert np.all(renyi[pixeldp > 0] > pixeldp[pixeldp > 0]) and np.any(pixeldp > 0)
    q = np.linspace(0.5, 0.999, 50)
    assert np.all(cohen_l2_radius(q, 1.0) >= renyi_l2_radius(q, 1 - q, 1.0) * (1 - 1e-12))


def test_pixeldp_radius_at_a_certain_classifier():
    # p1 = 1, p2 = 0: epsilon = 1 is feasible for every delta; the largest delta wins.
    assert pixeldp_l2_radius(1.0, 0.0, 2.0) == pytest.approx(2.0 / math.sqrt(2 * math.log(1.25 / 0.1)))


@pytest.mark.parametrize("name", sorted(PAIR_BOUNDS))
def test_radius_monotone_in_p1_p2_and_sigma_never_nan(name):
    bound = PAIR_BOUNDS[name]
    p1, p2 = np.meshgrid(EDGE_GRID, EDGE_GRID, indexing="ij")
    radius = bound(p1, p2, 0.5)
    assert not np.any(np.isnan(radius))
    capped = np.minimum(radius, 1e300)  # compare +inf with itself without inf - inf
    assert np.all(np.diff(capped, axis=0) >= 0), "non-decreasing in p1"
    assert np.all(np.diff(capped, axis=1) <= 0), "non-increasing in p2"
    assert np.all(bound(p1, p2, 0.8) >= radius), "non-decreasing in sigma"
    assert np.all(radius[p1 <= p2] == 0.0)
    assert np.all(np.isfinite(radius[p1 < 1]))
    if name != "pixeldp":  # PixelDP caps epsilon at 1, so its radius stays finite
        assert bound(1.0, 0.0, 0.5) == math.inf


def test_bounds_reject_invalid_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        renyi_l2_radius(1.2, 0.1, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        laplace_l1_radius(np.nan, 0.1, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        renyi_l2_radius(0.9, 0.1, 0.0)
    with pytest.raises(ValueError, match="order"):
        renyi_divergence_term(0.9, 0.1, 1.0)


def test_lemma1_is_a_tight_lower_bound_on_the_divergence():
    # Lemma 1: D_a(Q || P) >= term(a) whenever argmax Q != argmax P, with equality at the
    # minimiser of appendix B: q1 = q2 = q* / Z, qi = pi / Z, q* = M_{1-a}(p1, p2), Z = 1 - p1 - p2 + 2 q*.
    p = np.array([0.5, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(0)
    for order in (1.5, 2.0, 5.0):
        term = renyi_divergence_term(p[0], p[1], order)
        q_star = ((p[0] ** (1 - order) + p[1] ** (1 - order)) / 2) ** (1 / (1 - order))
        z = 1 - p[0] - p[1] + 2 * q_star
        minimiser = np.concatenate([[q_star, q_star], p[2:]]) / z
        assert renyi_divergence(minimiser, p, order) == pytest.approx(term, rel=1e-10)
        qs = rng.dirichlet(np.full(4, 0.7), size=3000)
        qs = qs[qs.argmax(axis=1) != 0]
        assert min(renyi_divergence(q, p, order) for q in qs) >= term


def test_lemma1_term_tends_to_the_laplace_quantity_at_large_order():
    # For p1 >= p2, M_{1-a}(p1, p2) -> min(p1, p2) = p2 as a -> inf, so the term increases
    # to -log(1 - p1 + p2), the quantity of Theorem 3 (Laplace noise, l1).
    for p1, p2 in [(0.7, 0.2), (0.9, 0.1), (0.5, 0.49), (0.8, 0.0)]:
        limit = -math.log(1 - p1 + p2)
        terms = renyi_divergence_term(p1, p2, np.array([1.5, 10.0, 1e3, 1e6, 1e9]))
        assert np.all(np.diff(terms) >= -1e-15) and np.all(terms <= limit * (1 + 1e-12))
        assert terms[-1] == pytest.approx(limit, rel=1e-7)


# --- Clopper-Pearson -----------------------------------------------------------------------


def bisect(f, target: float, increasing: bool) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def cp_lower_by_bisection(k: int, n: int, alpha: float) -> float:
    """The p at which P(X >= k) = alpha for X ~ Binomial(n, p)."""
    return 0.0 if k == 0 else bisect(lambda p: 1 - stats.binom.cdf(k - 1, n, p), alpha, increasing=True)


def cp_upper_by_bisection(k: int, n: int, alpha: float) -> float:
    """The p at which P(X <= k) = alpha for X ~ Binomial(n, p)."""
    return 1.0 if k == n else bisect(lambda p: stats.binom.cdf(k, n, p), alpha, increasing=False)


@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.3])
def test_clopper_pearson_matches_binomial_cdf_inversion(alpha):
    cases = [(0, 10), (1, 10), (5, 10), (10, 10), (37, 100), (99, 100), (100, 100), (500, 1000)]
    for k, n in cases:
        assert lower_bound(k, n, alpha) == pytest.approx(cp_lower_by_bisection(k, n, alpha), abs=1e-9)
        assert upper_bound(k, n, alpha) == pytest.approx(cp_upper_by_bisection(k, n, alpha), abs=1e-9)
    ks, ns = np.array([k for k, _ in cases]), np.array([n for _, n in cases])
    np.testing.assert_allclose(lower_bound(ks, ns, alpha), [lower_bound(k, n, alpha) for k, n in cases])


def test_clopper_pearson_edges_and_the_two_sided_interval():
    assert lower_bound(0, 50, 0.05) == 0.0 and upper_bound(50, 50, 0.05) == 1.0
    assert lower_bound(50, 50, 0.05) == pytest.approx(0.05 ** (1 / 50), rel=1e-12)
    assert upper_bound(0, 50, 0.05) == pytest.approx(1 - 0.05 ** (1 / 50), rel=1e-12)
    # Two one-sided bounds at alpha / 2 make the reporting module's two-sided interval.
    assert (lower_bound(37, 100, 0.025), upper_bound(37, 100, 0.025)) == pytest.approx(
        clopper_pearson(37, 100, 0.95), rel=1e-12)
    for bad in [dict(k=5, n=4, alpha=0.1), dict(k=1, n=0, alpha=0.1), dict(k=1, n=4, alpha=1.0)]:
        with pytest.raises(ValueError):
            lower_bound(**bad)


# --- certificates hold at their confidence -------------------------------------------------


def multinomial_sampler(probs, rng):
    """A synthetic noisy classifier given by its class probabilities: counts from a multinomial."""
    return lambda num, first_sample, stream: rng.multinomial(num, probs)


def true_radius(bound: str, probs: np.ndarray, predicted: int, sigma: float) -> float:
    """The radius the bound gives the predicted class from the true probabilities (0 if not the top)."""
    p_c = probs[predicted]
    p_other = np.delete(probs, predicted).max()
    return float(PAIR_BOUNDS[bound](p_c, p_other, sigma))


def failure_threshold(alpha: float, repetitions: int) -> float:
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / repetitions)


def failure_rate(probs, repetitions, bound, sigma, noise, **certify_kwargs) -> float:
    """Fraction of runs whose certificate claims more than the truth: a radius above the true one."""
    rng = np.random.default_rng(12345)
    probs = np.asarray(probs)
    failures = 0
    for _ in range(repetitions):
        cert = certify_from_counts(multinomial_sampler(probs, rng), sigma=sigma, noise=noise, **certify_kwargs)
        if cert.prediction != ABSTAIN:
            failures += cert.radius[bound] > true_radius(bound, probs, cert.prediction, sigma) * (1 + 1e-9)
    return failures / repetitions


ALPHA = 0.1
REPETITIONS = 2000


def test_certificates_hold_at_their_confidence():
    # Top two classes close and few selection samples: the selection is sometimes wrong, and
    # then the certificate must abstain.  One run fails if any of its radii is too large.
    probs = np.array([0.5, 0.4, 0.1])
    rng = np.random.default_rng(0)
    failures = 0
    for _ in range(REPETITIONS):
        cert = certify_from_counts(multinomial_sampler(probs, rng), 10, 400, 1 - ALPHA, 0.5, "gaussian")
        if cert.prediction != ABSTAIN:
            failures += any(cert.radius[b] > true_radius(b, probs, cert.prediction, 0.5) * (1 + 1e-9)
                            for b in ("renyi", "pixeldp", "cohen"))
    assert failures / REPETITIONS <= failure_threshold(ALPHA, REPETITIONS)


# Sequential setting: two classes, the requested radius equal to the true radius (so every
# certification at that radius is a false one), 20 looks.
SEQUENTIAL = dict(probs=[0.8, 0.2], repetitions=REPETITIONS, bound="laplace", sigma=1.0, noise="laplace",
                  n0=10, n=2000, confidence=1 - ALPHA, early_stop=True, batch=100,
                  radius=float(laplace_l1_radius(0.8, 0.2, 1.0)))


def test_early_stopped_certificates_hold_at_their_confidence():
    assert failure_rate(**SEQUENTIAL) <= failure_threshold(ALPHA, REPETITIONS)


def test_early_stopping_without_the_correction_breaks_the_guarantee(monkeypatch):
    # Negative control: the same procedure testing every look at the full alpha.
    monkeypatch.setattr(smooth_module, "per_look_alpha", lambda alpha, looks: alpha)
    assert failure_rate(**SEQUENTIAL) > failure_threshold(ALPHA, REPETITIONS)


def test_early_stopping_saves_samples_on_easy_inputs():
    probs = np.array([0.95, 0.03, 0.02])
    rng = np.random.default_rng(1)
    cert = certify_from_counts(multinomial_sampler(probs, rng), 100, 10_000, 0.999, 1.0, "gaussian",
                               radius=0.5, early_stop=True, batch=500)
    assert cert.prediction == 0 and cert.radius["renyi"] >= 0.5
    assert cert.samples_used <= 100 + 1000 and cert.n == 10_000
    # Hopeless input: decided as soon as the requested radius is out of reach.
    hopeless = certify_from_counts(multinomial_sampler(np.array([0.4, 0.35, 0.25]), rng), 100, 10_000, 0.999,
                                   1.0, "gaussian", radius=2.0, early_stop=True, batch=500)
    assert hopeless.samples_used <= 100 + 1000 and hopeless.radius["renyi"] < 2.0


# --- Smooth on real models -----------------------------------------------------------------


class Constant(nn.Module):
    """Always predicts ``label``; records how it was called."""

    def __init__(self, num_classes: int, label: int):
        super().__init__()
        self.num_classes, self.label = num_classes, label
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, x.dtype, torch.is_autocast_enabled("cpu")))
        logits = torch.zeros(x.shape[0], self.num_classes)
        logits[:, self.label] = 1.0
        return logits


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_sharded_counts_add_up_to_the_unsharded_counts(tiny_net, noise):
    smooth = Smooth(tiny_net, num_classes=3, sigma=0.5, noise=noise, chunk=16, seed=3)
    x = torch.rand(1, 8, 8)
    whole = smooth.sample_counts(x, 150, image_id=7)  # 9 full chunks and one of 6
    shards = (smooth.sample_counts(x, 48, 7, first_chunk=0) + smooth.sample_counts(x, 32, 7, first_chunk=3)
              + smooth.sample_counts(x, 70, 7, first_chunk=5))
    np.testing.assert_array_equal(whole, shards)
    assert whole.dtype == np.int64 and whole.sum() == 150
    # A fresh object with the same seed reproduces them; other images and streams differ.
    np.testing.assert_array_equal(Smooth(tiny_net, 3, 0.5, noise, chunk=16, seed=3).sample_counts(x, 150, 7), whole)
    noisy = Smooth(tiny_net, 3, 5.0, noise, chunk=16, seed=3)
    assert not np.array_equal(noisy.sample_counts(x, 150, 7), noisy.sample_counts(x, 150, 8))
    assert not np.array_equal(noisy.sample_counts(x, 150, 7), noisy.sample_counts(x, 150, 7, stream="select"))


def test_smooth_certify_is_certify_from_counts_on_its_samples(tiny_net):
    smooth = Smooth(tiny_net, num_classes=3, sigma=0.5, chunk=16)
    x = torch.rand(1, 8, 8)
    cert = smooth.certify(x, 32, 320, 0.99, image_id=4)
    again = certify_from_counts(lambda num, first, stream: smooth.sample_counts(x, num, 4, first // 16, stream),
                                32, 320, 0.99, 0.5)
    assert (cert.prediction, cert.p1_lower, cert.p2_upper, cert.radius) == (
        again.prediction, again.p1_lower, again.p2_upper, again.radius)
    assert cert.samples_used == 32 + 320 and cert.noise == "gaussian" and cert.sigma == 0.5
    stopped = smooth.certify(x, 32, 320, 0.99, image_id=4, radius=0.01, early_stop=True, batch=64)
    assert stopped.samples_used <= 32 + 320 and stopped.samples_used % 32 == 0


def test_constant_classifier_gets_the_largest_radius():
    n, confidence = 200, 0.99
    model = Constant(num_classes=4, label=2)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cert = Smooth(model, num_classes=4, sigma=0.5, chunk=64).certify(torch.rand(3, 4, 4), 10, n, confidence)
    # Run in eval mode, float32, autocast off; the caller's mode is restored.
    assert model.training and set(model.calls) == {(False, torch.float32, False)}
    alpha = 1 - confidence
    assert cert.prediction == 2
    assert cert.p1_lower == pytest.approx((alpha / 2) ** (1 / n), rel=1e-12)
    assert cert.p2_upper == pytest.approx(1 - (alpha / 2) ** (1 / n), rel=1e-12)
    # No other counts out of n give a larger radius, for any bound.
    k1, k2 = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    possible = k1 + k2 <= n
    p1, p2 = lower_bound(k1[possible], n, alpha / 2), upper_bound(k2[possible], n, alpha / 2)
    for bound in ("renyi", "pixeldp"):
        assert cert.radius[bound] >= PAIR_BOUNDS[bound](p1, p2, 0.5).max()
    assert cert.radius["cohen"] == pytest.approx(cohen_l2_radius(alpha ** (1 / n), 0.5))
    assert cert.radius["cohen"] >= cohen_l2_radius(lower_bound(np.arange(n + 1), n, alpha), 0.5).max()


def test_predict_abstains_on_a_tie_and_returns_a_clear_winner():
    assert predict_from_counts(np.array([3, 90, 7]), 0.99) == 1
    assert predict_from_counts(np.array([50, 50, 0]), 0.99) == ABSTAIN
    assert Smooth(Constant(5, 4), num_classes=5, sigma=1.0).predict(torch.rand(1, 2, 2), 100, 0.999) == 4


def test_certified_accuracy_counts_correct_unabstained_certificates_above_each_radius():
    def cert(prediction, radius):
        return Certificate(prediction, 0.9, 0.05, {"renyi": radius}, 100, 10, 0.95, 0.5, "gaussian", 0.0, 110)

    certs = [cert(0, 1.0), cert(1, 0.5), cert(ABSTAIN, 0.0), cert(2, 2.0)]
    labels = [0, 1, 1, 0]  # the last one is certified but wrong
    np.testing.assert_allclose(certified_accuracy(certs, labels, [0.0, 0.5, 0.75, 1.5], "renyi"),
                               [0.5, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="cohen"):
        certified_accuracy(certs, labels, [0.0], "cohen")


def test_presets_follow_the_papers():
    assert CERTIFY_PRESETS["cohen"] == {"n0": 100, "n": 100_000, "confidence": 0.999}
    assert CERTIFY_PRESETS["stn"]["confidence"] == 0.95
    rng = np.random.default_rng(0)
    for preset in CERTIFY_PRESETS.values():
        cert = certify_from_counts(multinomial_sampler([0.9, 0.1], rng), sigma=0.25, **preset)
        assert cert.prediction == 0 and cert.samples_used == preset["n0"] + preset["n"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma=0.0), r"sigma .*> 0"),
    (dict(sigma=-1.0), r"sigma .*> 0"),
    (dict(n0=100, n=50), r"n .*>= n0"),
    (dict(n0=0), r"n0 .*>= 1"),
    (dict(confidence=1.0), r"\(0, 1\)"),
    (dict(confidence=0.0), r"\(0, 1\)"),
    (dict(confidence=95), r"\(0, 1\)"),
    (dict(noise="uniform"), "gaussian"),
    (dict(early_stop=True), "radius"),
])
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    args = dict(n0=10, n=100, confidence=0.9, sigma=0.5, noise="gaussian") | kwargs
    with pytest.raises(ValueError, match=message):
        certify_from_counts(multinomial_sampler([0.9, 0.1], np.random.default_rng(0)), **args)


def test_smooth_rejects_invalid_arguments(tiny_net):
    with pytest.raises(ValueError, match=r"sigma .*> 0"):
        Smooth(tiny_net, 3, sigma=0.0)
    smooth = Smooth(tiny_net, 3, sigma=0.5, chunk=16)
    x = torch.rand(1, 8, 8)
    # a look batch that is no multiple of the chunk is fine: each look starts its own chunk seeds
    cert = smooth.certify(x, 10, 100, 0.9, radius=0.1, early_stop=True, batch=40)
    assert 10 < cert.samples_used <= 110  # n0 + at most n estimation samples
    with pytest.raises(ValueError, match=r"n .*>= n0"):
        smooth.certify(x, 100, 10, 0.9)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        smooth.predict(x, 10, 1.5)
    with pytest.raises(ValueError, match="logits"):
        Smooth(tiny_net, 4, sigma=0.5).sample_counts(x, 10, 0)
