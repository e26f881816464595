"""Attacks compared on the examples both attacked, from one model's stored rows.

Every accuracy follows the verdict's rule (:mod:`robust.results.verdict`): an
example's score under an attack is min(clean score, attack score), and an
attack's accuracy on a set of examples is the mean of that score.  Two attacks
are compared only on the examples both attacked (``attacked`` true and
``draws`` > 0; files without ``draws`` count every attacked row), and, where the
rows carry a ``check`` column, only on the examples it marks: the subset every
bounded attack attacked whatever the protocol.  Under the cascade protocol an
attack later in the list also sees the examples every earlier attack left
unbroken, on which the earlier attack scores high by selection; without the
``check`` column such a comparison favours the later attack.

On a deterministic model a comparison is exact on its examples (half-width 0).
On a stochastic one it carries the 95% interval of the mean paired difference
by the normal approximation over examples: d_e = score_b(e) - score_a(e),
half-width z_{0.975} * sd(d) / sqrt(n).  Examples are treated as independent;
where a model's noise is shared across a batch they are not, and the interval is
then too narrow.  Below :data:`~robust.evaluation.checks.MIN_PAIRED_EXAMPLES`
examples a stochastic comparison is not judged (infinite half-width).
"""
from __future__ import annotations

import math
from statistics import NormalDist, fmean, stdev
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from robust.evaluation.checks import MIN_PAIRED_EXAMPLES, EotConvergence, Paired
from robust.evaluation.protocol import CLEAN, EOT_CHECK_PREFIX
from robust.results.schema import read_kind
from robust.results.verdict import SCORE, with_scores

#: Optional boolean column: the example is in the subset every bounded attack attacked.
CHECK = "check"


def paired_half_width(differences: Sequence[float], confidence: float = 0.95) -> float:
    """Half-width of the normal-approximation interval of the mean of paired differences
    (inf for fewer than 2)."""
    if len(differences) < 2:
        return math.inf
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return z * stdev(differences) / math.sqrt(len(differences))


class TrialScores:
    """One model's rows (all labels, one trial) as per-example scores by label."""

    def __init__(self, rows: pa.Table, confidence: float = 0.95) -> None:
        self.rows = rows if SCORE in rows.column_names else with_scores(rows)
        self.confidence = confidence
        self.labels = set(self.rows["attack"].to_pylist())
        self.stochastic = bool(pc.any(self.rows["stochastic"]).as_py())
        self._cache: Dict[str, Dict[int, float]] = {}
        self.clean = self.attacked(CLEAN)
        self.checked: Optional[set] = None
        clean = self._part(CLEAN)
        if CHECK in self.rows.column_names and clean[CHECK].null_count < clean.num_rows:
            # files from before the column read back null: there, "attacked by both" is the rule
            self.checked = {e for e, c in zip(clean["example"].to_pylist(), clean[CHECK].to_pylist()) if c}

    def _part(self, label: str) -> pa.Table:
        return self.rows.filter(pc.equal(self.rows["attack"], label))

    def attacked(self, label: str) -> Dict[int, float]:
        """example -> verdict score of ``label``'s attacked rows (``attacked`` and drawn)."""
        part = self._part(label)
        mask = part["attacked"]
        if "draws" in part.column_names:
            mask = pc.and_(mask, pc.fill_null(pc.greater(part["draws"], 0), True))
        part = part.filter(mask)
        return dict(zip(part["example"].to_pylist(), part[SCORE].to_pylist()))

    def robust(self, label: str) -> Dict[int, float]:
        """example -> min(clean score, score under ``label``) on ``label``'s attacked examples."""
        if label not in self._cache:
            self._cache[label] = {e: min(self.clean[e], s) for e, s in self.attacked(label).items()
                                  if e in self.clean}
        return self._cache[label]

    def eot_samples(self, label: str) -> int:
        return int(pc.max(self._part(label)["eot_samples"]).as_py() or 1)

    def common(self, *labels: str) -> set:
        """The examples every one of ``labels`` attacked (within the check subset, if marked)."""
        examples = set.intersection(*(set(self.robust(a)) for a in labels))
        return examples if self.checked is None else examples & self.checked

    def accuracy(self, label: str, examples: set) -> float:
        scores = self.robust(label)
        return fmean(scores[e] for e in examples) if examples else math.nan

    def compare(self, first: str, second: str) -> Optional[Paired]:
        """``first`` and ``second`` on the examples both attacked (None when there are none)."""
        examples = sorted(self.common(first, second))
        if not examples:
            return None
        a, b = self.robust(first), self.robust(second)
        half = 0.0
        if self.stochastic:
            half = math.inf if len(examples) < MIN_PAIRED_EXAMPLES else \
                paired_half_width([b[e] - a[e] for e in examples], self.confidence)
        return Paired(fmean(a[e] for e in examples), fmean(b[e] for e in examples), len(examples), half)


def eot_convergence(rows: pa.Table | TrialScores, confidence: float = 0.95) -> Dict[str, EotConvergence]:
    """Per attack with an EOT check (rows ``sanity-eot-2x:<label>``): its robust accuracy at
    S and at 2S EOT samples on the examples both runs attacked, n, and the paired interval's
    half-width.  Answers "how many EOT samples are enough": where the two agree, S is."""
    scores = rows if isinstance(rows, TrialScores) else TrialScores(rows, confidence)
    out = {}
    for double in sorted(a for a in scores.labels if a.startswith(EOT_CHECK_PREFIX)):
        label = double[len(EOT_CHECK_PREFIX):]
        if label not in scores.labels:
            continue
        examples = sorted(scores.common(label, double))
        if not examples:
            continue
        at_s, at_2s = scores.robust(label), scores.robust(double)
        out[label] = EotConvergence(
            samples=scores.eot_samples(label), at_s=fmean(at_s[e] for e in examples),
            at_2s=fmean(at_2s[e] for e in examples), n=len(examples),
            half_width=paired_half_width([at_s[e] - at_2s[e] for e in examples], confidence))
    return out


def eot_rows(summaries: Sequence, fs: pafs.FileSystem, root: str
             ) -> Tuple[List[str], List[List[str]]]:
    """How many EOT samples are enough: per best model and attack with an EOT check, robust
    accuracy at S and at 2S samples on the same examples, the difference with its paired 95%
    half-width, and whether S is enough (the two agree within it)."""
    header = ["model", "attack", "n", "S", "acc at S [%]", "acc at 2S [%]", "difference [points]", "S enough"]
    attacks = read_kind(fs, root, "attack")
    rows = []
    if attacks.num_rows == 0:
        return header, rows
    for s in summaries:
        mine = attacks.filter(pc.equal(attacks["trial"], s.best.trial))
        for label, c in sorted(eot_convergence(mine).items()):
            enough = "yes" if c.converged else f"no: try {4 * c.samples}"
            if not c.judged:
                enough = "too few examples to tell"
            rows.append([f"{s.experiment}/{s.defense} {s.description} seed {s.best.seed}", label, str(c.n),
                         str(c.samples), f"{100 * c.at_s:.2f}", f"{100 * c.at_2s:.2f}",
                         f"{100 * c.difference:+.2f} ± {100 * c.half_width:.2f}",
                         enough])
    return header, rows
