"""Sanity flags that can fire: each on its positive control and not on its negative one.

Unit controls are small hand-built row tables (the stored attack rows of one model)
that go through ``flag_inputs`` and ``trial_flags`` as the runner's do; the
zero-gradient and cascade controls run the real protocol on the embedded digits.
Accuracies follow the verdict's rule: mean over the compared examples of
min(clean score, attack score), on the examples both attacks attacked.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import pyarrow as pa
import pytest
import torch
from helpers import Quantized
from torch import nn

from cluster.evaluation import flag_inputs
from robust.evaluation import checks
from robust.evaluation.protocol import CLEAN, EOT_CHECK_PREFIX, LARGE_EPS_LABEL, evaluate_shard
from robust.evaluation.suite import parse_attacks
from robust.results.paired import eot_convergence, paired_half_width

CPU = torch.device("cpu")
N = 40


def _part(label: str, scores: List[float], *, draws: int = 1, attacked: Optional[List[bool]] = None,
          eps: float = 0.1, eot: int = 1, zero_grad: Optional[List[bool]] = None,
          examples: Optional[List[int]] = None, check: Optional[List[bool]] = None) -> pa.Table:
    """Rows of one label: example i scores ``scores[i]`` (k = score * R of R draws); rows not
    attacked carry draws = 0 and a wrong prediction, as the cascade writes them."""
    n = len(scores)
    attacked = [True] * n if attacked is None else attacked
    r = [draws if a else 0 for a in attacked]
    k = [round(s * d) for s, d in zip(scores, r)]
    cols = {
        "attack": [label] * n, "example": examples or list(range(n)),
        "correct": [kk > 0 if d > 1 else kk == 1 for kk, d in zip(k, r)],
        "attacked": attacked, "eps": [eps] * n, "eot_samples": [eot] * n,
        "stochastic": [draws > 1] * n, "zero_grad": zero_grad or [False] * n, "prob_like": [False] * n,
        "draws": r, "draws_correct": k,
    }
    if check is not None:
        cols["check"] = check
    return pa.table(cols)


def _flags(*parts: pa.Table) -> Dict[str, checks.Flag]:
    inputs = flag_inputs(pa.concat_tables(parts))
    return {f.name: f for f in checks.trial_flags(**inputs)}


def _clean(draws: int = 1, n: int = N, **kw) -> pa.Table:
    return _part(CLEAN, [1.0] * n, draws=draws, eps=0.0, **kw)


# --- iterative weaker than FGSM ---------------------------------------------------------------

def _cascade_pgd(broken_on_check: bool) -> pa.Table:
    """PGD after FGSM in a cascade: it attacks the check subset (examples 0-7, FGSM broke them)
    and FGSM's survivors (20-39), which it never breaks; rows 8-19 were skipped."""
    scores = [0.0 if broken_on_check else 1.0] * 8 + [0.0] * 12 + [1.0] * 20
    return _part("pgd-20", scores, attacked=[True] * 8 + [False] * 12 + [True] * 20)


def test_iterative_weaker_than_fgsm_fires_in_cascade_on_the_examples_both_attacked():
    fgsm = _part("fgsm", [0.0] * 20 + [1.0] * 20)  # FGSM broke examples 0-19
    weak = _flags(_clean(), fgsm, _cascade_pgd(broken_on_check=False))["iterative-weaker-than-fgsm"]
    # common examples 0-7 and 20-39: FGSM 20/28, PGD 28/28
    assert weak.tripped and weak.value == pytest.approx(8 / 28)
    assert "on 28 common examples" in weak.detail
    assert not _flags(_clean(), fgsm, _cascade_pgd(broken_on_check=True))["iterative-weaker-than-fgsm"].tripped


def test_only_attacks_whose_threat_model_contains_fgsms_are_compared_with_it():
    fgsm = _part("fgsm", [0.0] * 20 + [1.0] * 20)
    smaller = _part("pgd-20:eps=0.05", [1.0] * N, eps=0.05)   # an eps-curve point: other budget
    l2 = _part("pgd-l2-20", [1.0] * N, eps=0.5)                 # another norm
    black = _part("square", [1.0] * N)                          # black-box: its own flag only
    inputs = flag_inputs(pa.concat_tables([_clean(), fgsm, smaller, l2, black]))
    assert inputs["single_step"] == {}
    rand = _part("apgd-ce-rand", [1.0] * N)  # apgd-rand's labels do not parse back: L-inf at their eps
    assert set(flag_inputs(pa.concat_tables([_clean(), fgsm, rand]))["single_step"]) == {("fgsm", "apgd-ce-rand")}


def test_on_a_stochastic_model_a_difference_counts_only_beyond_its_paired_interval():
    fgsm = _part("fgsm", [0.5] * N, draws=10, eot=20)
    clean = _clean(draws=10)
    # mean difference 0.05 either way; consistent: trips; noisy (+0.3 / -0.2): inside the interval
    steady = _part("pgd-20", [0.6, 0.5] * (N // 2), draws=10, eot=20)
    noisy = _part("pgd-20", [0.8, 0.3] * (N // 2), draws=10, eot=20)
    flag = _flags(clean, fgsm, steady)["iterative-weaker-than-fgsm"]
    assert flag.tripped and flag.value == pytest.approx(0.05) and "±" in flag.detail
    assert not _flags(clean, fgsm, noisy)["iterative-weaker-than-fgsm"].tripped
    # the same noisy numbers on fewer than MIN_PAIRED_EXAMPLES examples are not judged at all
    few = [_part(lbl, s[:10], draws=10, eot=20) for lbl, s in
           (("fgsm", [0.0] * 10), ("pgd-20", [1.0] * 10))]
    assert not _flags(_clean(draws=10, n=10), *few)["iterative-weaker-than-fgsm"].tripped


def test_a_check_column_restricts_comparisons_to_the_check_subset():
    """With ``check`` marked (the subset every bounded attack attacked), a black-box attack
    run after a white-box one in a cascade is not credited with the survivors it broke."""
    check = [True] * 8 + [False] * (N - 8)
    clean = _clean(check=check)
    white = _part("pgd-l2-10", [0.0] * 20 + [1.0] * 20, eps=0.5, check=check)
    # on the check subset 0-7 the black-box attack breaks what PGD broke; on PGD's survivors
    # 20-39 it breaks half: on all common examples it would look stronger than PGD
    black = _part("boundary", [0.0] * 8 + [0.0] * 12 + [0.0, 1.0] * 10, eps=0.5,
                  attacked=[True] * 8 + [False] * 12 + [True] * 20, check=check)
    marked = flag_inputs(pa.concat_tables([clean, white, black]))
    assert marked["black_box"]["boundary"] == (0.0, "pgd-l2-10", 0.0)
    unmarked = flag_inputs(pa.concat_tables([t.drop_columns(["check"]) for t in (clean, white, black)]))
    assert unmarked["black_box"]["boundary"][0] < unmarked["black_box"]["boundary"][2]


# --- more iterations weaker, black box, minimal norm, large eps ----------------------------

def test_more_iterations_weaker_compares_pgd_runs_on_common_examples():
    pgd7 = _part("pgd-7", [0.0] * 20 + [1.0] * 20)
    capped = [True] * 10 + [False] * 30  # PGD-100 with its own cap: 10 examples
    worse = _part("pgd-100", [1.0] * 10 + [0.0] * 30, attacked=capped)
    better = _part("pgd-100", [0.0] * 10 + [0.0] * 30, attacked=capped)
    flag = _flags(_clean(), pgd7, worse)["more-iterations-weaker"]
    assert flag.tripped and flag.value == pytest.approx(1.0) and "on 10 common examples" in flag.detail
    assert not _flags(_clean(), pgd7, better)["more-iterations-weaker"].tripped


def test_black_box_stronger_than_white_box_on_common_examples():
    white = _part("pgd-l2-10", [0.0] * 10 + [1.0] * 30, eps=0.5)
    capped = [True] * 20 + [False] * 20
    stronger = _part("boundary", [0.0] * 20 + [0.0] * 20, eps=0.5, attacked=capped)
    weaker = _part("boundary", [0.0] * 10 + [1.0] * 10 + [0.0] * 20, eps=0.5, attacked=capped)
    flag = _flags(_clean(), white, stronger)["black-box-stronger-than-white-box"]
    assert flag.tripped and flag.value == pytest.approx(0.5)  # on examples 0-19: 0% < 50%
    assert not _flags(_clean(), white, weaker)["black-box-stronger-than-white-box"].tripped


def test_minimal_norm_success_on_a_stochastic_model_is_a_score_below_one_half():
    clean = _clean(draws=10)
    # first draws happen to classify the points correctly, but most draws do not: successes
    found = _part("deepfool", [0.4, 0.3] * (N // 2), draws=10, eps=math.inf)
    assert all(found["correct"].to_pylist())
    assert not _flags(clean, found)["minimal-norm-attack-incomplete"].tripped
    missed = _part("deepfool", [0.4] * (N - 1) + [0.6], draws=10, eps=math.inf)
    flag = _flags(clean, missed)["minimal-norm-attack-incomplete"]
    assert flag.tripped and flag.value == pytest.approx(1 / N)


def test_large_eps_flag_uses_the_verdict_scores():
    broken = _part(LARGE_EPS_LABEL, [0.0] * 8, draws=10, eps=1.0, eot=20)
    held = _part(LARGE_EPS_LABEL, [0.0] * 7 + [0.3], draws=10, eps=1.0, eot=20)
    assert not _flags(_clean(draws=10), broken)["large-eps-not-broken"].tripped
    flag = _flags(_clean(draws=10), held)["large-eps-not-broken"]
    assert flag.tripped and flag.value == pytest.approx(1 - 0.3 / 8)


# --- zero gradients ------------------------------------------------------------------------

def test_one_example_with_a_zero_gradient_trips_the_flag():
    one = [False] * (N - 1) + [True]
    flag = _flags(_clean(zero_grad=one))["zero-gradients"]
    assert flag.tripped and flag.value == pytest.approx(1 / N) and flag.detail.startswith(f"1 of {N} examples")
    assert not _flags(_clean())["zero-gradients"].tripped


class Confident(nn.Module):
    """Honest gradients, very confident logits: cross-entropy's input gradient underflows to
    exactly zero in float32 on the examples it classifies with a large margin."""

    def __init__(self, model: nn.Module, scale: float = 1e4) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.scale * self.model(x)


def _as_rows(columns) -> pa.Table:
    """evaluate_shard's columns as one table of rows with their attack label (as stored)."""
    return pa.concat_tables([pa.table({**c, "attack": [label] * len(c["example"])})
                             for label, c in columns.items()], promote_options="default")


def _clean_rows(model, digits, n=32):
    return _as_rows(evaluate_shard(model.eval(), digits.test, range(n), parse_attacks(["fgsm"], digits.eps),
                                   digits.eps, CPU, seed=0, batch_size=n, large_eps_examples=0))


def test_zero_gradient_flag_on_real_rows_masked_versus_merely_confident(trained_digits_model, digits):
    confident = Confident(trained_digits_model)
    x, y, _ = digits.test.batch(torch.arange(32))
    x.requires_grad_(True)
    torch.nn.functional.cross_entropy(confident(x), y, reduction="sum").backward()
    underflow = int((x.grad.flatten(1).abs().amax(1) == 0).sum())
    assert underflow > 0  # the control is real: cross-entropy would call these masked
    assert not _flags(_clean_rows(confident, digits))["zero-gradients"].tripped
    masked = _flags(_clean_rows(Quantized(trained_digits_model), digits))["zero-gradients"]
    assert masked.tripped and masked.value == 1.0


def test_iterative_weaker_than_fgsm_fires_in_a_real_cascade(trained_digits_model, digits):
    """FGSM first, then a PGD too feeble to move (one step of eps/100): only the check subset
    lets the flag see that it leaves examples correct that FGSM broke."""
    def flags(names, **kw):
        return _flags(_as_rows(evaluate_shard(trained_digits_model.eval(), digits.test, range(64),
                                              parse_attacks(names, digits.eps), digits.eps, CPU, seed=0,
                                              batch_size=32, protocol="cascade", large_eps_examples=0, **kw)))

    feeble = ["fgsm", "pgd-1:step_fraction=0.01,random_start=False"]
    flag = flags(feeble)["iterative-weaker-than-fgsm"]
    assert flag.tripped, flag
    # without the check subset the cascade shows PGD only FGSM's survivors: it could not fire
    # (the flag is absent where no example can be compared fairly)
    blind = flags(feeble, check_examples=0)
    assert "iterative-weaker-than-fgsm" not in blind or not blind["iterative-weaker-than-fgsm"].tripped
    assert not flags(["fgsm", "pgd-10"])["iterative-weaker-than-fgsm"].tripped


# --- EOT not converged -----------------------------------------------------------------------

def _eot(double_scores: List[float], n_check: int = 24) -> List[pa.Table]:
    """pgd-20 with S = 20 on 40 examples (score 0.5 each) and its 2S = 40 rerun on the first
    ``n_check`` examples."""
    return [_clean(draws=10), _part("pgd-20", [0.5] * N, draws=10, eot=20),
            _part(EOT_CHECK_PREFIX + "pgd-20", double_scores[:n_check], draws=10, eot=40,
                  examples=list(range(n_check)))]


def test_eot_not_converged_when_2s_samples_make_the_attack_stronger_beyond_the_interval():
    stronger = _eot([0.2] * 12 + [0.3] * 12)
    flag = _flags(*stronger)["eot-not-converged"]
    assert flag.tripped and flag.value == pytest.approx(0.25)
    assert "pgd-20 S=20: 50.0% vs 2S=40: 25.0% on 24 examples" in flag.detail
    within = _eot([0.6, 0.4] * 12)  # 2S differs per example, not on average
    assert not _flags(*within)["eot-not-converged"].tripped
    too_few = _eot([0.0] * 10, n_check=10)
    flag = _flags(*too_few)["eot-not-converged"]
    assert not flag.tripped and "not judged" in flag.detail


def test_eot_convergence_returns_what_the_summary_prints():
    """Per attack: S, accuracy at S and at 2S on the same examples, n, and the paired half-width."""
    rows = pa.concat_tables(_eot([0.2] * 12 + [0.3] * 12))
    result = eot_convergence(rows)["pgd-20"]
    assert (result.samples, result.n) == (20, 24)
    assert (result.at_s, result.at_2s) == pytest.approx((0.5, 0.25))
    differences = [0.3] * 12 + [0.2] * 12
    assert result.half_width == pytest.approx(paired_half_width(differences))
    assert result.half_width == pytest.approx(1.959964 * 0.0510754 / math.sqrt(24), rel=1e-4)
    assert eot_convergence(pa.concat_tables(_eot([0.5] * 24)))["pgd-20"].converged
    assert eot_convergence(pa.concat_tables(_eot([0.5] * 24)[:2])) == {}  # no 2S rows: nothing to say


def test_rows_from_before_schema_4_score_their_single_draw():
    """Old files have no draws column: every attacked row counts with its ``correct``."""
    parts = [_clean(), _part("fgsm", [0.0] * 20 + [1.0] * 20), _cascade_pgd(broken_on_check=False)]
    old = pa.concat_tables([t.drop_columns(["draws", "draws_correct"]) for t in parts])
    flags = {f.name: f for f in checks.trial_flags(**flag_inputs(old))}
    # without draws the cascade's skipped rows (attacked false) still stay out of the comparison
    assert flags["iterative-weaker-than-fgsm"].tripped
