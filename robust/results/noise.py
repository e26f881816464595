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

from robust.defenses.learn2perturb import NOISE_KEY
from robust.results.epochs import epoch_metric_curves
from robust.results.summary import save_line_plot


def noise_curves(fs: pafs.FileSystem, root: str) -> List[dict]:
    """One dict per trial that logged noise scales: trial, defense, epochs, mean (over all
    scales) and layers ({layer: values per epoch}), epochs ascending."""
    curves = []
    for c in epoch_metric_curves(fs, root, NOISE_KEY + "*"):
        if NOISE_KEY not in c["metrics"]:
            continue
        curves.append({
            "trial": c["trial"], "defense": c["defense"], "epochs": c["epochs"],
            "mean": c["metrics"][NOISE_KEY],
            "layers": {k[len(NOISE_KEY) + 1:]: v for k, v in c["metrics"].items()
                       if k.startswith(NOISE_KEY + "/")},
        })
    return curves


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
