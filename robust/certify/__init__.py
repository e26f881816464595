"""Certification of classifiers under additive noise (STN, Li et al. 2019; Cohen et al. 2019).

- ``bounds``: certified radii from the top-two class probabilities (pure functions).
- ``confidence``: one-sided Clopper-Pearson bounds.
- ``smooth``: ``Smooth`` (seeded noise, predict, certify), ``certify_from_counts``
  (the certificate logic on any count sampler), presets, certified accuracy, and
  the largest radius a sample size can certify (``largest_radius``).
"""
from robust.certify.bounds import (
    cohen_l2_radius,
    laplace_l1_radius,
    pixeldp_l2_radius,
    renyi_divergence_term,
    renyi_l2_radius,
)
from robust.certify.confidence import lower_bound, upper_bound
from robust.certify.smooth import (
    ABSTAIN,
    BOUNDS,
    CERTIFY_PRESETS,
    Certificate,
    Smooth,
    certified_accuracy,
    certify_from_counts,
    largest_radius,
    look_batch,
    predict_from_counts,
)

__all__ = [
    "ABSTAIN",
    "BOUNDS",
    "CERTIFY_PRESETS",
    "Certificate",
    "Smooth",
    "certified_accuracy",
    "certify_from_counts",
    "cohen_l2_radius",
    "laplace_l1_radius",
    "largest_radius",
    "look_batch",
    "lower_bound",
    "pixeldp_l2_radius",
    "predict_from_counts",
    "renyi_divergence_term",
    "renyi_l2_radius",
    "upper_bound",
]
