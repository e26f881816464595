"""Confidence intervals for accuracies and the paired test between two models."""
from __future__ import annotations

from typing import Sequence, Tuple

from scipy import stats


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> Tuple[float, float]:
    """Exact two-sided binomial interval for a proportion (Clopper & Pearson 1934)."""
    if n == 0:
        return 0.0, 1.0
    alpha = 1 - confidence
    lo = 0.0 if successes == 0 else stats.beta.ppf(alpha / 2, successes, n - successes + 1)
    hi = 1.0 if successes == n else stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes)
    return float(lo), float(hi)


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> Tuple[int, int, float]:
    """Exact McNemar test on paired outcomes of two models on the same examples.

    Returns (b, c, p): b = examples only A gets right, c = only B gets right,
    p the two-sided exact binomial p-value of b vs c under H0: P = 1/2.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError("McNemar needs the same examples for both models")
    b = sum(1 for a, c in zip(correct_a, correct_b) if a and not c)
    c = sum(1 for a, c_ in zip(correct_a, correct_b) if c_ and not a)
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5)))


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (Efron & Tibshirani 1993)."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
