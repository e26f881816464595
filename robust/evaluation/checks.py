"""Sanity flags that mark an evaluation as not credible, each a small pure function.

In the spirit of AutoAttack's checks (Croce & Hein 2020) and Carlini et al.'s
evaluation checklist (2019): each returns a :class:`Flag` that is ``tripped``
when the evaluation looks unreliable, with the value it was computed from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

#: eps of the large-budget check: the whole [0,1] box in L-inf, so a working
#: gradient attack can reach any image and must fool (about) every example.
LARGE_EPS = 1.0
LARGE_EPS_MIN_SUCCESS = 0.99
ZERO_GRAD_MAX_FRACTION = 0.05
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Flag:
    name: str
    tripped: bool
    value: float
    detail: str


def large_eps_success(success_rate: float) -> Flag:
    """At eps = 1 (L-inf) an attack must succeed on ~100% of examples; less suggests
    gradient masking (or a bug)."""
    return Flag("large-eps-not-broken", success_rate < LARGE_EPS_MIN_SUCCESS, success_rate,
                f"success {100 * success_rate:.1f}% at eps {LARGE_EPS} (need >= {100 * LARGE_EPS_MIN_SUCCESS:.0f}%)")


def iterative_weaker_than_single_step(single_step_acc: float, iterative_acc: Dict[str, float]) -> Flag:
    """An iterative attack (PGD, APGD) must leave at most the accuracy FGSM leaves."""
    worse = {k: v for k, v in iterative_acc.items() if v > single_step_acc + TOLERANCE}
    value = max(worse.values()) - single_step_acc if worse else 0.0
    return Flag("iterative-weaker-than-fgsm", bool(worse), value,
                ", ".join(f"{k} {100 * v:.2f}% > fgsm {100 * single_step_acc:.2f}%" for k, v in worse.items()))


def more_iterations_weaker(acc_by_steps: Mapping[int, float]) -> Flag:
    """Accuracy must not rise with the number of iterations of the same attack."""
    steps = sorted(acc_by_steps)
    rises = [(a, b) for a, b in zip(steps, steps[1:]) if acc_by_steps[b] > acc_by_steps[a] + TOLERANCE]
    value = max((acc_by_steps[b] - acc_by_steps[a] for a, b in rises), default=0.0)
    return Flag("more-iterations-weaker", bool(rises), value,
                ", ".join(f"{b} steps {100 * acc_by_steps[b]:.2f}% > {a} steps {100 * acc_by_steps[a]:.2f}%"
                          for a, b in rises))


def zero_gradients(fraction: float) -> Flag:
    """Inputs whose loss gradient is exactly zero cannot be attacked by gradients."""
    return Flag("zero-gradients", fraction > ZERO_GRAD_MAX_FRACTION, fraction,
                f"{100 * fraction:.1f}% of examples have an all-zero input gradient")


def probabilities_as_logits(fraction: float) -> Flag:
    """Outputs in [0,1] that sum to 1 are probabilities: cross-entropy on them saturates."""
    return Flag("outputs-look-like-probabilities", fraction > 0.5, fraction,
                f"{100 * fraction:.1f}% of outputs are in [0,1] and sum to 1")


def non_eot_on_stochastic(labels: List[str]) -> Flag:
    """A gradient attack without EOT on a stochastic model underestimates it."""
    return Flag("non-eot-attack-on-stochastic-model", bool(labels), float(len(labels)), ", ".join(labels))


#: A black-box attack must beat the strongest white-box attack of its threat model by more
#: than this (absolute accuracy on the same examples) to trip the flag: one example in 100
#: is within the draw-to-draw noise of a randomized model's predictions.
BLACK_BOX_MARGIN = 0.01


def white_box_covers(black_box: Tuple[str, float], white_box: Tuple[str, float]) -> bool:
    """Whether a white-box threat model (norm, eps) contains the black-box one: same norm, eps >= ."""
    return white_box[0] == black_box[0] and white_box[1] >= black_box[1] - TOLERANCE


def black_box_stronger_than_white_box(pairs: Mapping[str, Tuple[float, str, float]]) -> Flag:
    """A black-box attack that leaves lower accuracy than every white-box attack of the same
    threat model means the gradients are masked (Athalye et al. 2018; Carlini et al. 2019, 'verify
    that black-box attacks do not outperform white-box ones').

    ``pairs``: black-box label -> (its accuracy, the strongest covering white-box label, that
    attack's accuracy), both accuracies on the same examples.
    """
    worse = {k: v for k, v in pairs.items() if v[0] < v[2] - BLACK_BOX_MARGIN}
    value = max((wb - bb for bb, _, wb in worse.values()), default=0.0)
    return Flag("black-box-stronger-than-white-box", bool(worse), value,
                ", ".join(f"{k} {100 * bb:.2f}% < {w} {100 * wb:.2f}%" for k, (bb, w, wb) in worse.items()))


def minimal_norm_incomplete(success: Mapping[str, float]) -> Flag:
    """An unbounded minimal-norm attack (CW, DeepFool, growing FGSM, FAB-T-min) can move an
    input anywhere in [0,1]^d, so it must find an adversarial point for every example it
    attacks; less means its search is blocked (masked gradients) or too short.

    ``success``: minimal-norm label -> fraction of its attacked examples it misclassified.
    """
    short = {k: v for k, v in success.items() if v < 1.0 - TOLERANCE}
    value = 1.0 - min(short.values()) if short else 0.0
    return Flag("minimal-norm-attack-incomplete", bool(short), value,
                ", ".join(f"{k} {100 * v:.2f}% success" for k, v in short.items()))


def pgd_steps(label: str) -> int | None:
    """Steps of a plain L-inf PGD label ('pgd-20' -> 20), else None."""
    m = re.fullmatch(r"pgd-(\d+)", label)
    return int(m.group(1)) if m else None


def trial_flags(accuracy: Mapping[str, float], zero_grad_fraction: float, prob_like_fraction: float,
                large_eps_success_rate: float | None, non_eot: List[str],
                black_box: Mapping[str, Tuple[float, str, float]] | None = None,
                minimal_norm_success: Mapping[str, float] | None = None) -> List[Flag]:
    """All flags of one evaluated model from its aggregate numbers."""
    flags = [zero_gradients(zero_grad_fraction), probabilities_as_logits(prob_like_fraction),
             non_eot_on_stochastic(non_eot)]
    if minimal_norm_success:
        flags.append(minimal_norm_incomplete(minimal_norm_success))
    if black_box:
        flags.append(black_box_stronger_than_white_box(black_box))
    if large_eps_success_rate is not None:
        flags.append(large_eps_success(large_eps_success_rate))
    iterative = {k: v for k, v in accuracy.items() if k not in ("clean", "fgsm")}
    if "fgsm" in accuracy and iterative:
        flags.append(iterative_weaker_than_single_step(accuracy["fgsm"], iterative))
    by_steps = {pgd_steps(k): v for k, v in accuracy.items() if pgd_steps(k) is not None}
    if len(by_steps) > 1:
        flags.append(more_iterations_weaker(by_steps))
    return flags
