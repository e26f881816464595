"""Paper-style summaries computed from the results files alone.

For each experiment, defense and configuration: accuracy clean and under each
attack as mean +- std over seeds (like Table 1 of the constant-perturbation
paper), and the best seed's whole row.  The best seed is chosen by the
selection metric on the *validation* split (PGD accuracy, the strongest
attack run during training), never by test numbers, so the reported test row
is not selected on the test set.
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

from robust.results.schema import read_kind

COMPLETED = "completed"


@dataclass
class ConfigSummary:
    """One configuration of one defense in one experiment, over its seeds."""

    experiment: str
    defense: str
    config_id: str
    description: str
    seeds: List[int]
    accuracy: Dict[str, List[float]]          # attack -> per-seed test accuracy (seed order)
    best_seed: Optional[int]
    best_row: Dict[str, float]
    flags: List[str] = field(default_factory=list)


def attack_order(label: str) -> Tuple[int, int, str]:
    """clean, fgsm, then pgd-n by n, then the rest by name: weakest attack first."""
    if label == "clean":
        return (0, 0, label)
    if label == "fgsm":
        return (1, 0, label)
    m = re.fullmatch(r"pgd-(\d+)", label)
    if m:
        return (2, int(m.group(1)), label)
    return (3, 0, label)


def describe_config(config_json: str) -> str:
    """Short text for a configuration: its defense settings, e.g. 'bound=0.2 copies=5'."""
    spec = json.loads(config_json)
    settings = spec.get("defense_config", {})
    parts = []
    for key in sorted(settings):
        value = settings[key]
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts) or "default"


def sanity_flags(accuracy: Dict[str, float]) -> List[str]:
    """Flags that an evaluation is not credible: an attack beating clean accuracy
    means it failed; more PGD steps or PGD scoring above FGSM suggests masked gradients."""
    flags = []
    clean = accuracy.get("clean")
    for label, acc in accuracy.items():
        if label != "clean" and clean is not None and acc > clean + 1e-9:
            flags.append(f"{label}>clean")
    pgds = sorted((attack_order(a)[1], acc) for a, acc in accuracy.items() if attack_order(a)[0] == 2)
    if "fgsm" in accuracy and pgds and pgds[-1][1] > accuracy["fgsm"] + 1e-9:
        flags.append("pgd>fgsm")
    for (n1, a1), (n2, a2) in zip(pgds, pgds[1:]):
        if a2 > a1 + 1e-9:
            flags.append(f"pgd-{n2}>pgd-{n1}")
    return flags


def summarize_experiment(fs: pafs.FileSystem, root: str, experiment: str) -> List[ConfigSummary]:
    trials = read_kind(fs, root, "trials")
    attacks = read_kind(fs, root, "attack")
    if trials.num_rows == 0 or attacks.num_rows == 0:
        return []
    acc = attacks.group_by(["trial", "attack"]).aggregate([("correct", "mean")])
    per_trial: Dict[str, Dict[str, float]] = {}
    for t, a, v in zip(acc["trial"].to_pylist(), acc["attack"].to_pylist(), acc["correct_mean"].to_pylist()):
        per_trial.setdefault(t, {})[a] = v
    done = trials.filter(pc.equal(trials["status"], COMPLETED)).to_pylist()
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for row in sorted(done, key=lambda r: (r["defense"], r["config_id"], r["seed"])):
        if row["trial"] in per_trial:
            groups.setdefault((row["defense"], row["config_id"]), []).append(row)
    out = []
    for (defense, config_id), rows in groups.items():
        labels = sorted({a for r in rows for a in per_trial[r["trial"]]}, key=attack_order)
        accuracy = {a: [per_trial[r["trial"]].get(a, math.nan) for r in rows] for a in labels}
        best = max(rows, key=lambda r: (_finite(r["val_pgd_acc"]), -r["seed"]))
        best_row = per_trial[best["trial"]]
        out.append(ConfigSummary(
            experiment, defense, config_id, describe_config(rows[0]["config"]),
            [r["seed"] for r in rows], accuracy, best["seed"], best_row, sanity_flags(best_row)))
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


def summary_rows(summaries: Sequence[ConfigSummary]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of the summary table (accuracies in percent)."""
    labels = sorted({a for s in summaries for a in s.accuracy}, key=attack_order)
    header = ["experiment", "defense", "config", "seeds"] + labels + ["best seed"] + \
        [f"best {a}" for a in labels] + ["flags"]
    rows = []
    for s in summaries:
        rows.append([s.experiment, s.defense, s.description, str(len(s.seeds))]
                    + [mean_std(s.accuracy.get(a, [])) for a in labels]
                    + [str(s.best_seed)]
                    + [f"{100 * s.best_row[a]:.2f}" if a in s.best_row else "-" for a in labels]
                    + [",".join(s.flags) or "ok"])
    return header, rows


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
        table.add_column(h, justify="left" if h in ("experiment", "defense", "config", "flags") else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=max(160, 12 * len(header))).print(table)
