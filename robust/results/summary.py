"""Paper-style summaries computed from the results files alone.

For each experiment, defense and configuration: accuracy clean and under each
attack as mean +- std over seeds (like Table 1 of the constant-perturbation
paper), the worst case over all attacks, and the best seed's whole row.  The
best seed is chosen by the selection metric on the *validation* split (PGD
accuracy), never by test numbers.  For the best models: accuracies with 95%
Clopper-Pearson intervals, the stored sanity flags, and McNemar tests between
models evaluated on the same examples.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from statistics import mean, stdev
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from robust.evaluation.stats import bootstrap_interval, clopper_pearson, mcnemar
from robust.evaluation.suite import is_minimal_norm
from robust.results.schema import read_kind
from robust.results.verdict import SCORE, with_scores

COMPLETED = "completed"
CLEAN = "clean"
WORST = "worst-case"
WORST_VOTE = "worst-case (vote)"
SANITY_PREFIX = "sanity-"
#: What the best-model table says about intervals of stochastic models.
STOCHASTIC_NOTE = ("stochastic models: accuracy = mean over examples of the fraction of R fresh draws "
                   "correct, min(clean, attack); worst-case = min over clean and every attack; "
                   "'worst-case (vote)' = majority of the R draws correct under all of them; intervals "
                   "are bootstraps over examples, which assume independent examples and so do not "
                   "account for noise shared across a batch (e.g. PNI's weight noise)")


@dataclass
class TrialResult:
    """One evaluated model: per-attack verdict scores on its examples.

    ``outcomes[attack][example]`` is the row's score, the fraction of the verdict's R
    draws that classified the example correctly (0 or 1 for a deterministic model;
    :mod:`robust.results.verdict`); ``votes`` holds the majority vote's correctness.
    An attack's accuracy is the mean over its examples of min(clean score, attack
    score): an example misclassified when clean is never robust.
    """

    trial: str
    seed: int
    val_metric: float
    outcomes: Dict[str, Dict[int, float]]       # attack -> example -> score (k / R)
    votes: Dict[str, Dict[int, bool]] = field(default_factory=dict)  # attack -> example -> vote correct
    stochastic: bool = False
    flags: List[str] = field(default_factory=list)
    metric: str = "val_pgd_acc"

    def scores(self, attack: str) -> Dict[int, float]:
        """Per example: min(clean score, the attack's score) (the clean score for 'clean')."""
        own = self.outcomes[attack]
        clean = self.outcomes.get(CLEAN)
        if attack in (CLEAN, WORST) or clean is None:
            return own
        return {e: min(v, clean[e]) if e in clean else v for e, v in own.items()}

    def accuracy(self, attack: str) -> float:
        values = list(self.scores(attack).values())
        return sum(values) / len(values) if values else math.nan

    def vote_accuracy(self, attack: str) -> float:
        own, clean = self.votes.get(attack, {}), self.votes.get(CLEAN, {})
        values = [v and clean.get(e, True) for e, v in own.items()]
        return sum(values) / len(values) if values else math.nan

    def counts(self, attack: str) -> Tuple[float, int]:
        """(sum of the per-example scores, examples): integers for a deterministic model."""
        values = list(self.scores(attack).values())
        return sum(values), len(values)

    def interval(self, attack: str, confidence: float = 0.95) -> Tuple[float, float]:
        """Exact Clopper-Pearson where every score is 0 or 1; otherwise a percentile bootstrap
        over examples (seeded), which treats examples as independent (see the summary's note
        on models whose noise is shared across a batch)."""
        values = list(self.scores(attack).values())
        if all(v in (0.0, 1.0) for v in values):
            return clopper_pearson(int(sum(values)), len(values), confidence)
        return bootstrap_interval(values, confidence)


@dataclass
class ConfigSummary:
    """One configuration of one defense in one experiment, over its seeds."""

    experiment: str
    defense: str
    config_id: str
    description: str
    trials: List[TrialResult]
    best: TrialResult

    @property
    def seeds(self) -> List[int]:
        return [t.seed for t in self.trials]

    @property
    def accuracy(self) -> Dict[str, List[float]]:
        labels = sorted({a for t in self.trials for a in t.outcomes}, key=attack_order)
        return {a: [t.accuracy(a) if a in t.outcomes else math.nan for t in self.trials] for a in labels}

    @property
    def best_seed(self) -> int:
        return self.best.seed


def attack_order(label: str) -> Tuple[int, int, str]:
    """clean, fgsm, pgd-n by n, the rest by name, the worst case last."""
    if label == "clean":
        return (0, 0, label)
    if label == "fgsm":
        return (1, 0, label)
    m = re.fullmatch(r"pgd-(\d+)", label)
    if m:
        return (2, int(m.group(1)), label)
    if label == WORST:
        return (9, 0, label)
    return (3, 0, label)


def describe_config(config_json: str) -> str:
    """Short text for a configuration: its defense settings, e.g. 'bound=0.2 copies=5'."""
    spec = json.loads(config_json)
    settings = spec.get("defense_config", {})
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(settings.items())]
    return " ".join(parts) or "default"


def _is_curve_point(label: str) -> bool:
    return ":eps=" in label


def trial_results(attacks: pa.Table, trials: Sequence[dict], checks: pa.Table) -> Dict[str, TrialResult]:
    """Per-trial scores; the worst case is the per-example minimum over clean and every
    bounded attack, on the examples all of them cover (the vote worst case likewise)."""
    out: Dict[str, TrialResult] = {}
    attacks = with_scores(attacks)
    cols = attacks.select(["trial", "attack", "example", SCORE, "vote_correct", "stochastic"]).to_pydict()
    for t, a, e, score, v, s in zip(*cols.values()):
        if t not in out:
            out[t] = TrialResult(t, 0, math.nan, {})
        if a.startswith(SANITY_PREFIX) or _is_curve_point(a) or is_minimal_norm(a):
            # minimal-norm attacks are unbounded: reported apart (minimal_norm_rows), not in the worst case
            continue
        out[t].outcomes.setdefault(a, {})[e] = score
        out[t].votes.setdefault(a, {})[e] = bool(v)
        out[t].stochastic |= bool(s)
    for result in out.values():
        if len(result.outcomes) > 1:
            examples = sorted(set.intersection(*(set(o) for o in result.outcomes.values())))
            result.outcomes[WORST] = {e: min(o[e] for o in result.outcomes.values()) for e in examples}
            if result.stochastic:
                result.votes[WORST_VOTE] = {e: all(v[e] for v in result.votes.values()) for e in examples}
    for row in trials:
        if row["trial"] in out:
            out[row["trial"]].seed = row["seed"]
            out[row["trial"]].metric, out[row["trial"]].val_metric = selection_metric(row)
    if checks.num_rows:
        tripped = checks.filter(pc.equal(checks["tripped"], True)).select(["trial", "flag"]).to_pylist()
        for row in tripped:
            if row["trial"] in out:
                out[row["trial"]].flags.append(row["flag"])
    return out


def selection_metric(row: dict) -> Tuple[str, float]:
    """(name, value) of the metric a trial was selected by, on the validation split: the
    defense's own (stored with the trial since schema 4), else validation PGD accuracy."""
    name, value = row.get("metric"), row.get("metric_value")
    if name and value is not None:
        return name, value
    return "val_pgd_acc", row.get("val_pgd_acc")


def summarize_experiment(fs: pafs.FileSystem, root: str, experiment: str) -> List[ConfigSummary]:
    trials = read_kind(fs, root, "trials")
    attacks = read_kind(fs, root, "attack")
    if trials.num_rows == 0 or attacks.num_rows == 0:
        return []
    done = trials.filter(pc.equal(trials["status"], COMPLETED)).to_pylist()
    results = trial_results(attacks, done, read_kind(fs, root, "checks"))
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for row in sorted(done, key=lambda r: (r["defense"], r["config_id"], r["seed"])):
        if row["trial"] in results:
            groups.setdefault((row["defense"], row["config_id"]), []).append(row)
    out = []
    for (defense, config_id), rows in groups.items():
        members = [results[r["trial"]] for r in rows]
        best = max(members, key=lambda t: (_finite(t.val_metric), -t.seed))
        out.append(ConfigSummary(experiment, defense, config_id, describe_config(rows[0]["config"]),
                                 members, best))
    by_trial = {r["trial"]: r for r in done}
    for key in sorted(results):  # other classifiers of a trial ('<trial>:base', '<trial>:n=5'): one line each
        parent, _, variant = key.partition(":")
        if variant and parent in by_trial:
            row, result = by_trial[parent], results[key]
            result.seed, (result.metric, result.val_metric) = row["seed"], selection_metric(row)
            label = "base network" if variant == "base" else f"noisy {variant}"
            out.append(ConfigSummary(experiment, row["defense"], f"{row['config_id']}:{variant}",
                                     f"{describe_config(row['config'])} [{label}]", [result], result))
    return out


def _finite(x: Optional[float]) -> float:
    return x if x is not None and math.isfinite(x) else -math.inf


def mean_std(values: Sequence[float]) -> str:
    vals = [100 * v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{mean(vals):.2f} ± {stdev(vals):.2f}"


def _labels(summaries: Sequence[ConfigSummary]) -> List[str]:
    return sorted({a for s in summaries for a in s.accuracy}, key=attack_order)


def summary_rows(summaries: Sequence[ConfigSummary]) -> Tuple[List[str], List[List[str]]]:
    """Seeds table: mean +- std over seeds per attack, then the best seed's row (percent)."""
    labels = _labels(summaries)
    header = ["experiment", "defense", "config", "seeds"] + labels + ["best seed"] + \
        [f"best {a}" for a in labels]
    rows = []
    for s in summaries:
        acc = s.accuracy
        rows.append([s.experiment, s.defense, s.description, str(len(s.seeds))]
                    + [mean_std(acc.get(a, [])) for a in labels] + [str(s.best_seed)]
                    + [f"{100 * s.best.accuracy(a):.2f}" if a in s.best.outcomes else "-" for a in labels])
    return header, rows


def best_model_rows(summaries: Sequence[ConfigSummary], confidence: float = 0.95
                    ) -> Tuple[List[str], List[List[str]]]:
    """Per-attack table of the best models: accuracy [95% interval], n, the majority-vote
    accuracy of stochastic models (and their vote worst case), the metric that chose the
    model, flags.  See :data:`STOCHASTIC_NOTE` for the rules."""
    labels = _labels(summaries)
    vote_worst = any(WORST_VOTE in s.best.votes for s in summaries)
    header = ["experiment", "defense", "config", "seed", "selected by", "n"] + labels + \
        ([WORST_VOTE] if vote_worst else []) + ["stochastic", "flags"]
    rows = []
    for s in summaries:
        b = s.best
        cells = []
        for a in labels:
            if a not in b.outcomes:
                cells.append("-")
                continue
            lo, hi = b.interval(a, confidence)
            vote = f" vote {100 * b.vote_accuracy(a):.1f}" if b.stochastic and a in b.votes else ""
            cells.append(f"{100 * b.accuracy(a):.2f} [{100 * lo:.1f}, {100 * hi:.1f}]{vote}")
        if vote_worst:
            cells.append(f"{100 * b.vote_accuracy(WORST_VOTE):.2f}" if WORST_VOTE in b.votes else "-")
        n_examples = max((len(o) for o in b.outcomes.values()), default=0)
        metric = f"{b.metric} {100 * b.val_metric:.2f}" if b.val_metric is not None and \
            math.isfinite(b.val_metric) else b.metric
        rows.append([s.experiment, s.defense, s.description, str(b.seed), metric, str(n_examples)] + cells
                    + ["yes" if b.stochastic else "no", ",".join(b.flags) or "ok"])
    return header, rows


def paired_rows(summaries: Sequence[ConfigSummary], attack: str = WORST) -> Tuple[List[str], List[List[str]]]:
    """McNemar tests between best models on the examples both were evaluated on.  An example
    counts as right where its score is at least 1/2 (deterministic: correct; stochastic: the
    majority of the verdict's draws), since the test needs one binary outcome per example."""
    header = ["model A", "model B", "attack", "n", "only A right", "only B right", "p (exact McNemar)"]
    rows = []
    named = [(f"{s.experiment}/{s.defense} {s.description} seed {s.best.seed}", s.best) for s in summaries]
    for i in range(len(named)):
        for j in range(i + 1, len(named)):
            (na, a), (nb, b) = named[i], named[j]
            label = attack if attack in a.outcomes and attack in b.outcomes else CLEAN
            sa, sb = a.scores(label), b.scores(label)
            common = sorted(set(sa) & set(sb))
            if not common:
                continue
            only_a, only_b, p = mcnemar([sa[e] >= 0.5 for e in common], [sb[e] >= 0.5 for e in common])
            rows.append([na, nb, label, str(len(common)), str(only_a), str(only_b), f"{p:.3g}"])
    return header, rows


def curve_points(fs: pafs.FileSystem, root: str) -> List[dict]:
    """Robust accuracy versus eps: rows (trial, attack, eps, accuracy, n) of the eps-curve labels."""
    attacks = read_kind(fs, root, "attack")
    if attacks.num_rows == 0:
        return []
    labels = [a for a in set(attacks["attack"].to_pylist()) if _is_curve_point(a)]
    if not labels:
        return []
    rows = with_scores(attacks.filter(pc.is_in(attacks["attack"], pa.array(labels + ["clean"]))))
    agg = rows.group_by(["trial", "attack", "eps"]).aggregate([(SCORE, "mean"), (SCORE, "count")])
    points = [{"trial": t, "attack": a.split(":eps=")[0], "eps": e, "accuracy": m, "n": n}
              for t, a, e, m, n in zip(*agg.select(["trial", "attack", "eps", f"{SCORE}_mean",
                                                      f"{SCORE}_count"]).to_pydict().values())]
    curves = {(p["trial"], p["attack"]) for p in points if p["attack"] != "clean"}
    clean = {p["trial"]: p for p in points if p["attack"] == "clean"}
    # every curve starts at eps = 0 with the clean accuracy
    return [p for p in points if p["attack"] != "clean"] + [
        {**clean[t], "attack": a, "eps": 0.0} for t, a in sorted(curves) if t in clean]


def plot_curves(points: Sequence[dict], path: str, names: Dict[str, str]) -> None:
    """Robust accuracy versus eps as a PNG (like constant perturbations Fig. 1)."""
    lines = []
    for (trial, attack) in sorted({(p["trial"], p["attack"]) for p in points}):
        pts = sorted((p["eps"], p["accuracy"]) for p in points if p["trial"] == trial and p["attack"] == attack)
        lines.append(([e for e, _ in pts], [100 * a for _, a in pts], f"{names.get(trial, trial)} ({attack})"))
    save_line_plot(lines, "eps", "robust accuracy [%]", path)


def save_line_plot(lines: Sequence[Tuple[Sequence[float], Sequence[float], str]], xlabel: str, ylabel: str,
                   path: str, ylim: Optional[Tuple[float, float]] = (0, 100)) -> None:
    """A PNG of accuracy-style curves (y in percent, 0 to 100; ``ylim`` None scales y to
    the data), one (xs, ys, label) per line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for xs, ys, label in lines:
        ax.plot(list(xs), list(ys), marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_markdown(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_csv(header: List[str], rows: List[List[str]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().rstrip("\n")


def print_rich_table(header: List[str], rows: List[List[str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for h in header:
        left = h in ("experiment", "defense", "config", "flags", "model A", "model B", "attack")
        table.add_column(h, justify="left" if left else "right")
    for r in rows:
        table.add_row(*r)
    # wide enough that no cell wraps: tables are read, and copied into papers
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    Console(width=max(100, sum(widths) + 3 * len(widths) + 1)).print(table)
