"""Learned noise scales over training (Learn2Perturb, Figure 4): read and plot.

Noise-injection defenses (`learn2perturb`, `learn2perturb-r`, `pni`) log, per
epoch, the mean noise scale of every layer (``noise_mean/<layer>``) and over
all scales (``noise_mean``) into the training rows.  Each trial's file is read
on its own, since trials of different models or defenses have different
layer columns (a dataset over all files would keep only the first file's).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from robust.defenses.learn2perturb import NOISE_KEY
from robust.results.summary import save_line_plot


def noise_curves(fs: pafs.FileSystem, root: str) -> List[dict]:
    """One dict per trial that logged noise scales: trial, defense, epochs, mean (over all
    scales) and layers ({layer: values per epoch}), epochs ascending."""
    base = f"{root}/data/train"
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    curves = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        with fs.open_input_file(info.path) as f:
            table = pq.read_table(f)
        if NOISE_KEY not in table.column_names:
            continue
        parts = dict(p.split("=", 1) for p in info.path.split("/") if "=" in p)
        rows = sorted(table.to_pylist(), key=lambda r: r["epoch"])
        layers = [c for c in table.column_names if c.startswith(NOISE_KEY + "/")]
        curves.append({
            "trial": parts.get("trial", info.path), "defense": parts.get("defense", ""),
            "epochs": [int(r["epoch"]) for r in rows],
            "mean": [float(r[NOISE_KEY]) for r in rows],
            "layers": {c[len(NOISE_KEY) + 1:]: [float(r[c]) for r in rows] for c in layers},
        })
    return sorted(curves, key=lambda c: (c["defense"], c["trial"]))


def plot_noise(curves: Sequence[dict], path: str, names: Dict[str, str], per_layer: bool = False) -> None:
    """Mean noise scale versus epoch, one line per trial (per layer too with ``per_layer``):
    PNI's scales shrink while Learn2Perturb's grow (Figure 4)."""
    lines = []
    for c in curves:
        label = names.get(c["trial"], f"{c['defense']} {c['trial']}")
        if per_layer:
            lines += [(c["epochs"], v, f"{label} {layer}") for layer, v in c["layers"].items()]
        else:
            lines.append((c["epochs"], c["mean"], label))
    save_line_plot(lines, "epoch", "mean noise scale (theta; PNI: a)", path, ylim=None)
