"""Any per-epoch training metric over epochs: read and plot (``launch/summarize.py --plot-metric``).

Defenses log their own per-epoch values into the training rows (SDR's
``sigma_min``, ``sigma_max``, ``sigma_mean/<layer>``; Learn2Perturb's
``noise_mean/<layer>``).  Columns are chosen by a shell-style glob
(``fnmatch``), e.g. ``'sigma_*'``.  Each trial's file is read on its own, since
trials of different models or defenses have different columns (a dataset over
all files would keep only the first file's).
"""
from __future__ import annotations

import fnmatch
import math
from typing import Dict, List, Sequence

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from robust.results.schema import join
from robust.results.summary import save_line_plot


def epoch_metric_curves(fs: pafs.FileSystem, root: str, pattern: str) -> List[dict]:
    """One dict per trial with a matching column: trial, defense, epochs (ascending) and
    metrics ({column: value per epoch}, None where an epoch lacks a finite value)."""
    base = join(root, "data", "train")
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    curves = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        with fs.open_input_file(info.path) as f:
            table = pq.read_table(f)
        columns = sorted(c for c in table.column_names if fnmatch.fnmatchcase(c, pattern) and c != "epoch")
        if not columns or "epoch" not in table.column_names:
            continue
        parts = dict(p.split("=", 1) for p in info.path.split("/") if "=" in p)
        rows = sorted(table.to_pylist(), key=lambda r: r["epoch"])
        curves.append({
            "trial": parts.get("trial", info.path), "defense": parts.get("defense", ""),
            "epochs": [int(r["epoch"]) for r in rows],
            "metrics": {c: [_number(r.get(c)) for r in rows] for c in columns},
        })
    return sorted(curves, key=lambda c: (c["defense"], c["trial"]))


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def plot_epoch_metrics(curves: Sequence[dict], path: str, names: Dict[str, str], pattern: str) -> None:
    """Every matching column versus epoch, one line per (trial, column), y scaled to the data."""
    lines = []
    for c in curves:
        label = names.get(c["trial"], f"{c['defense']} {c['trial']}")
        for column, values in c["metrics"].items():
            points = [(e, v) for e, v in zip(c["epochs"], values) if v is not None]
            if points:
                lines.append(([e for e, _ in points], [v for _, v in points], f"{label} {column}"))
    save_line_plot(lines, "epoch", pattern, path, ylim=None)
