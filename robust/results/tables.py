"""Summaries of the result kinds beside the per-attack table: the transfer matrix
(constant perturbations A.1), certified accuracy against radius (STN Figure 1,
Cohen et al. Table 1) and the R2/R4 robustness scores (Tibo et al. Table 2,
Figure 4).  Like :mod:`robust.results.summary`, they read the results files only.
"""
from __future__ import annotations

import math
from statistics import mean
from typing import Dict, List, Sequence, Tuple

import pyarrow.fs as pafs

from robust.results.schema import read_kind
from robust.results.summary import attack_order, mean_std, save_line_plot


def transfer_rows(fs: pafs.FileSystem, root: str, names: Dict[str, str]) -> Tuple[List[str], List[List[str]]]:
    """Transfer matrix per attack: accuracy [%] of each target (column) on the examples crafted on
    each source (row), '-' where a cell was not evaluated (the diagonal of a seed matrix), and a
    last row per attack with each model's mean +- std over the other models of the matrix
    (constant perturbations A.1, Table 5); sources that are not targets (an external model,
    Table 10) are rows of their own, outside that mean."""
    table = read_kind(fs, root, "transfer")
    if table.num_rows == 0:
        return [], []
    agg = table.group_by(["attack", "source", "trial"]).aggregate([("correct", "mean")])
    cells = {(a, s, t): v for a, s, t, v in zip(*agg.select(["attack", "source", "trial",
                                                              "correct_mean"]).to_pydict().values())}
    attacks = sorted({k[0] for k in cells}, key=attack_order)
    sources = sorted({k[1] for k in cells})
    targets = sorted({k[2] for k in cells})
    seeds = [s for s in sources if s in targets]  # the matrix's models; a named outside source is its own row
    header = ["attack", "source \\ target"] + [names.get(t, t) for t in targets]
    rows = []
    for a in attacks:
        for s in sources:
            if any((a, s, t) in cells for t in targets):
                rows.append([a, names.get(s, s)] + [f"{100 * cells[(a, s, t)]:.2f}" if (a, s, t) in cells else "-"
                                                    for t in targets])
        if len(seeds) > 1:
            rows.append([a, "mean ± std over the other models"] + [
                mean_std([cells[(a, s, t)] for s in seeds if (a, s, t) in cells]) for t in targets])
    return header, rows


CERTIFY_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)  # Cohen et al. Table 1 radii (plus 0)


def parse_radii(text: str) -> Tuple[float, ...]:
    """Radii a user names ('0.1,0.3'): finite numbers >= 0; ValueError naming a bad one."""
    radii = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--radii: {item.strip()!r} is not a number; give radii >= 0 separated by "
                             "commas, e.g. 0.1,0.3") from None
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--radii: {item.strip()} is not a finite radius >= 0; e.g. 0.1,0.3")
        radii.append(value)
    return tuple(radii)


def with_default_radii(radii: Sequence[float]) -> Tuple[float, ...]:
    """``radii`` besides the defaults (``CERTIFY_RADII``), sorted, each once."""
    return tuple(sorted(set(CERTIFY_RADII) | set(radii)))


def certified_curves(fs: pafs.FileSystem, root: str, radii: Sequence[float] = CERTIFY_RADII) -> List[dict]:
    """Certified accuracy at each radius per (trial, sigma, bound) (STN Figure 1, Cohen et al.
    Table 1): the prediction is correct, the bound does not abstain, and its radius >= r.

    A bound abstains where the pair test does (``abstain``) or its radius is 0 (Cohen's
    CERTIFY abstains when its p_A lower bound is <= 1/2 even when the pair test
    predicts): such images are certified at no radius, 0 included
    (``robust.certify.Certificate.abstains``; the rule reads the radius, so files
    written before the ``abstain_<bound>`` columns give the same numbers).  ``abstain``
    is that bound's abstention rate.  ``predict``: Cohen's PREDICT accuracy with
    abstain counted as wrong, over the images that have it (None where none has).
    """
    table = read_kind(fs, root, "certify")
    if table.num_rows == 0:
        return []
    out = []
    bounds = [c[len("radius_"):] for c in table.column_names if c.startswith("radius_")]
    data = table.to_pydict()
    groups: Dict[Tuple[str, str], List[int]] = {}
    for i, key in enumerate(zip(data["trial"], data["sigma"])):
        groups.setdefault(key, []).append(i)
    for (trial, sigma), idx in sorted(groups.items()):
        predicted = [data["predict_correct"][i] for i in idx] if "predict_correct" in data else []
        predicted = [p for p in predicted if p is not None]
        for bound in bounds:
            radius = [data[f"radius_{bound}"][i] for i in idx]
            if any(r is None for r in radius):
                continue
            certifies = [not data["abstain"][i] and r > 0 for i, r in zip(idx, radius)]
            ok = [data["correct"][i] and c for i, c in zip(idx, certifies)]
            out.append({"trial": trial, "sigma": float(sigma), "bound": bound, "n_images": len(idx),
                        "abstain": 1 - sum(certifies) / len(idx),
                        "samples": sum(data["samples_used"][i] for i in idx) / len(idx),
                        "predict": sum(predicted) / len(predicted) if predicted else None,
                        "accuracy": [sum(o and r >= t for o, r in zip(ok, radius)) / len(idx) for t in radii]})
    return out


def certified_rows(curves: Sequence[dict], names: Dict[str, str], radii: Sequence[float] = CERTIFY_RADII
                   ) -> Tuple[List[str], List[List[str]]]:
    """The certified-accuracy table; 'PREDICT [%]' is Cohen's PREDICT accuracy (abstain = wrong)."""
    header = ["model", "sigma", "bound", "images", "abstain [%]", "samples/image", "PREDICT [%]"] + \
        [f"r={r:g}" for r in radii]
    rows = [[names.get(c["trial"], c["trial"]), f"{c['sigma']:g}", c["bound"], str(c["n_images"]),
             f"{100 * c['abstain']:.1f}", f"{c['samples']:.0f}",
             "-" if c["predict"] is None else f"{100 * c['predict']:.1f}"] + [f"{100 * a:.1f}" for a in c["accuracy"]]
            for c in curves]
    return header, rows


def plot_certified(curves: Sequence[dict], path: str, names: Dict[str, str],
                   radii: Sequence[float] = CERTIFY_RADII) -> None:
    """Certified accuracy versus radius as a PNG, one line per (model, sigma, bound)."""
    save_line_plot([(radii, [100 * a for a in c["accuracy"]],
                     f"{names.get(c['trial'], c['trial'])} sigma={c['sigma']:g} ({c['bound']})") for c in curves],
                   "radius", "certified accuracy [%]", path)


SCORE_ATTACKS = ("fgsm", "pgd", "deepfool")  # robust.scores.r2.R2_ATTACKS, without importing torch


def score_summaries(fs: pafs.FileSystem, root: str) -> List[dict]:
    """Per trial: mean R2 margin (= area under its margin curve), the share of examples
    whose closest boundary point came from each attack (Table 2), and mean R4."""
    table = read_kind(fs, root, "scores")
    if table.num_rows == 0:
        return []
    data = table.select(["trial", "score", "value", "found", "closest"]).to_pydict()
    out: Dict[str, dict] = {}
    for trial, score, value, found, closest in zip(*data.values()):
        t = out.setdefault(trial, {"trial": trial, "r2": [], "r4": [], "closest": [], "found": []})
        if score == "r2":
            t["r2"].append(value)
            t["found"].append(found)
            if found:
                t["closest"].append(closest)
        elif value is not None and not math.isnan(value):
            t["r4"].append(value)
    return [out[k] for k in sorted(out)]


def score_rows(summaries: Sequence[dict], names: Dict[str, str]) -> Tuple[List[str], List[List[str]]]:
    header = ["model", "R2 examples", "R2 (mean margin, L2)", "no boundary [%]"] + \
        [f"closest {a} [%]" for a in SCORE_ATTACKS] + ["R4 examples", "R4"]
    rows = []
    for s in summaries:
        n2, closest = len(s["r2"]), s["closest"]
        r2 = f"{mean(s['r2']):.4f}" if n2 else "-"
        missing = f"{100 * (1 - sum(s['found']) / n2):.1f}" if n2 else "-"
        shares = [f"{100 * closest.count(a) / len(closest):.1f}" if closest else "-" for a in SCORE_ATTACKS]
        r4 = f"{mean(s['r4']):.4f}" if s["r4"] else "-"
        rows.append([names.get(s["trial"], s["trial"]), str(n2), r2, missing, *shares, str(len(s["r4"])), r4])
    return header, rows


def plot_margin_curves(summaries: Sequence[dict], path: str, names: Dict[str, str], points: int = 60) -> None:
    """Margin curves (Figure 4): the share of examples with margin > eps, against eps,
    one line per model, the area under each curve (its R2) in the legend."""
    with_r2 = [s for s in summaries if s["r2"]]
    top = max(max(s["r2"]) for s in with_r2)
    grid = [top * i / (points - 1) for i in range(points)]
    lines = []
    for s in with_r2:
        m = s["r2"]
        curve = [100 * sum(v > e for v in m) / len(m) for e in grid]
        lines.append((grid, curve, f"{names.get(s['trial'], s['trial'])} (area {mean(m):.3f})"))
    save_line_plot(lines, "eps (L2)", "examples with margin > eps [%]", path)
