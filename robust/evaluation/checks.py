"""Sanity flags that mark an evaluation as not credible, each a small pure function.

In the spirit of AutoAttack's checks (Croce & Hein 2020) and Carlini et al.'s
evaluation checklist (2019): each returns a :class:`Flag` that is ``tripped``
when the evaluation looks unreliable, with the value it was computed from.

Accuracies here are those of the verdict (:mod:`robust.results.verdict`): an
attack's accuracy is the mean over examples of min(clean score, attack score).
Two attacks are compared only on the examples both attacked
(:mod:`robust.results.paired` builds the :class:`Paired` numbers from rows):
on a deterministic model the comparison is exact on those examples; on a
stochastic one a difference counts only beyond the 95% interval of the paired
per-example differences.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Mapping, Tuple

#: eps of the large-budget check: the whole [0,1] box in L-inf, so a working
#: gradient attack can reach any image and must fool (about) every example.
LARGE_EPS = 1.0
LARGE_EPS_MIN_SUCCESS = 0.99
TOLERANCE = 1e-9
#: Fewest paired examples a stochastic comparison (and the EOT check) judges: below it the
#: normal approximation of the paired differences is not trusted and no flag trips.
MIN_PAIRED_EXAMPLES = 20


@dataclass(frozen=True)
class Flag:
    name: str
    tripped: bool
    value: float
    detail: str


@dataclass(frozen=True)
class Paired:
    """Accuracies of two attacks on the same ``n`` examples, ``first`` the reference.

    ``half_width``: of the 95% interval of ``second - first`` (0: exact, a deterministic
    model; inf: too few examples to judge a stochastic one)."""

    first: float
    second: float
    n: int
    half_width: float = 0.0

    @property
    def difference(self) -> float:
        return self.second - self.first

    def second_higher(self, margin: float = 0.0) -> bool:
        """``second`` exceeds ``first`` by more than ``margin`` and the interval."""
        return self.difference > self.half_width + margin + TOLERANCE


@dataclass(frozen=True)
class EotConvergence:
    """Robust accuracy of one attack at S and at 2S EOT samples on the same ``n`` examples,
    and the half-width of the paired 95% interval of their difference."""

    samples: int        # S; the check ran with 2S
    at_s: float
    at_2s: float
    n: int
    half_width: float

    @property
    def difference(self) -> float:
        """acc(S) - acc(2S): positive when doubling the samples made the attack stronger."""
        return self.at_s - self.at_2s

    @property
    def judged(self) -> bool:
        return self.n >= MIN_PAIRED_EXAMPLES

    @property
    def converged(self) -> bool:
        """False when the two accuracies differ beyond their interval (on enough examples)."""
        return not (self.judged and abs(self.difference) > self.half_width + TOLERANCE)

    def describe(self) -> str:
        return (f"S={self.samples}: {100 * self.at_s:.1f}% vs 2S={2 * self.samples}: {100 * self.at_2s:.1f}% "
                f"on {self.n} examples (difference {100 * self.difference:+.1f}% ± {100 * self.half_width:.1f}%"
                + ("" if self.judged else f"; fewer than {MIN_PAIRED_EXAMPLES} examples, not judged") + ")")


def large_eps_success(success_rate: float) -> Flag:
    """At eps = 1 (L-inf) an attack must succeed on ~100% of examples; less suggests
    gradient masking (or a bug)."""
    return Flag("large-eps-not-broken", success_rate < LARGE_EPS_MIN_SUCCESS, success_rate,
                f"success {100 * success_rate:.1f}% at eps {LARGE_EPS} (need >= {100 * LARGE_EPS_MIN_SUCCESS:.0f}%)")


def _pair_text(first: str, second: str, p: Paired) -> str:
    interval = f" ± {100 * p.half_width:.2f}%" if p.half_width else ""
    return (f"{second} {100 * p.second:.2f}% > {first} {100 * p.first:.2f}% on {p.n} common examples"
            f" (difference {100 * p.difference:.2f}%{interval})")


def iterative_weaker_than_single_step(pairs: Mapping[Tuple[str, str], Paired]) -> Flag:
    """An iterative attack (PGD, APGD, ...) whose threat model contains FGSM's must leave at most
    the accuracy FGSM leaves on the same examples.

    ``pairs``: (FGSM label, iterative label) -> their accuracies (first FGSM's) on the examples
    both attacked."""
    worse = {k: p for k, p in pairs.items() if p.second_higher()}
    value = max((p.difference for p in worse.values()), default=0.0)
    return Flag("iterative-weaker-than-fgsm", bool(worse), value,
                ", ".join(_pair_text(f, i, p) for (f, i), p in worse.items()))


def more_iterations_weaker(pairs: Mapping[Tuple[int, int], Paired]) -> Flag:
    """Accuracy must not rise with the number of iterations of the same attack (PGD-a then
    PGD-b, a < b, on the examples both attacked; first is PGD-a's accuracy)."""
    rises = {k: p for k, p in pairs.items() if p.second_higher()}
    value = max((p.difference for p in rises.values()), default=0.0)
    return Flag("more-iterations-weaker", bool(rises), value,
                ", ".join(_pair_text(f"{a} steps", f"{b} steps", p) for (a, b), p in rises.items()))


def zero_gradients(zero: int, examples: int) -> Flag:
    """An input whose margin-loss gradient is exactly zero cannot be attacked by gradients:
    one such example is enough (a logit-margin gradient does not underflow on confident
    examples the way cross-entropy's does in float32, so a zero is masking, not confidence)."""
    fraction = zero / examples if examples else 0.0
    return Flag("zero-gradients", zero > 0, fraction,
                f"{zero} of {examples} examples ({100 * fraction:.1f}%) have an all-zero input gradient "
                f"of the logit margin")


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

    ``success``: minimal-norm label -> fraction of its attacked examples it made adversarial
    (the verdict's score below 1/2: most draws misclassify; deterministic: misclassified).
    """
    short = {k: v for k, v in success.items() if v < 1.0 - TOLERANCE}
    value = 1.0 - min(short.values()) if short else 0.0
    return Flag("minimal-norm-attack-incomplete", bool(short), value,
                ", ".join(f"{k} {100 * v:.2f}% success" for k, v in short.items()))


def eot_not_converged(results: Mapping[str, EotConvergence]) -> Flag:
    """Robust accuracy at S and at 2S EOT samples must agree within their paired interval:
    a difference means S samples do not estimate the expected gradient well enough
    (Athalye et al. 2018, section 4; the 'rand' EOT of Croce & Hein 2020 uses S = 20).

    The value is acc(S) - acc(2S) of the attack that differs most."""
    off = {k: r for k, r in results.items() if not r.converged}
    shown = off or results
    value = max((r.difference for r in shown.values()), key=abs, default=0.0)
    return Flag("eot-not-converged", bool(off), value,
                ", ".join(f"{k} {r.describe()}" for k, r in shown.items()))


def pgd_steps(label: str) -> int | None:
    """Steps of a plain L-inf PGD label ('pgd-20' -> 20), else None."""
    m = re.fullmatch(r"pgd-(\d+)", label)
    return int(m.group(1)) if m else None


def trial_flags(zero_grad: Tuple[int, int], prob_like_fraction: float, large_eps_success_rate: float | None,
                non_eot: List[str], single_step: Mapping[Tuple[str, str], Paired] | None = None,
                by_steps: Mapping[Tuple[int, int], Paired] | None = None,
                black_box: Mapping[str, Tuple[float, str, float]] | None = None,
                minimal_norm_success: Mapping[str, float] | None = None,
                eot: Mapping[str, EotConvergence] | None = None) -> List[Flag]:
    """All flags of one evaluated model from its aggregate numbers (``flag_inputs`` in
    cluster/evaluation.py computes them from the rows).  ``zero_grad``: (examples with an
    all-zero margin gradient, clean examples)."""
    flags = [zero_gradients(*zero_grad), probabilities_as_logits(prob_like_fraction),
             non_eot_on_stochastic(non_eot)]
    if minimal_norm_success:
        flags.append(minimal_norm_incomplete(minimal_norm_success))
    if black_box:
        flags.append(black_box_stronger_than_white_box(black_box))
    if large_eps_success_rate is not None:
        flags.append(large_eps_success(large_eps_success_rate))
    if single_step:
        flags.append(iterative_weaker_than_single_step(single_step))
    if by_steps:
        flags.append(more_iterations_weaker(by_steps))
    if eot:
        flags.append(eot_not_converged(eot))
    return flags
