#!/usr/bin/env python
"""Print paper-style tables from one or more experiments' results.

    python launch/summarize.py results/<experiment> [more experiments ...] [--format table|markdown|csv]
    python launch/summarize.py results/<experiment> --radii 0.1,0.3   # certified accuracy at these radii too

Reads only the Parquet files (locally or from s3://bucket/prefix/<experiment>):
per defense and configuration, accuracy clean and under each attack as
mean +- std over seeds, and the best seed's whole row (best by the defense's
own selection metric on the validation split, named in the table).  Several experiments print side by side, e.g. a defense next to
its baselines.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from cluster.cli import OneLineParser

FORMATS = ("table", "markdown", "csv")


def _emit(fmt: str, title: str, header: List[str], rows: List[List[str]]) -> None:
    from robust.results import summary

    if fmt == "markdown":
        print(f"\n**{title}**\n")
        print(summary.format_markdown(header, rows))
    elif fmt == "csv":
        print(f"# {title}")
        print(summary.format_csv(header, rows))
    else:
        summary.print_rich_table(header, rows, title)


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineParser(prog="summarize.py", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="experiment folders or s3:// prefixes")
    parser.add_argument("--format", default="table", choices=FORMATS)
    parser.add_argument("--endpoint", default=None, help="S3-compatible endpoint URL")
    parser.add_argument("--plot", metavar="PNG", help="write robust accuracy versus eps curves to this file")
    parser.add_argument("--plot-certified", metavar="PNG", help="write certified accuracy versus radius here")
    parser.add_argument("--budgets", action="append", default=[], metavar="NORM=B1,B2,...",
                        help="budgets at which to show minimal-norm attacks' success, e.g. l2=0.5,1 "
                        "(repeatable; default per norm: robust.results.minimal_norm.MINIMAL_NORM_BUDGETS)")
    parser.add_argument("--radii", metavar="R1,R2,...",
                        help="also show certified accuracy at these radii (besides 0, 0.25, 0.5, 0.75, 1)")
    parser.add_argument("--plot-margins", metavar="PNG", help="write R2 margin curves (areas in the legend) here")
    parser.add_argument("--plot-noise", metavar="PNG", help="write the learned noise scales per epoch "
                        "(learn2perturb, pni: Learn2Perturb Figure 4) to this file")
    parser.add_argument("--plot-metric", nargs=2, metavar=("PATTERN", "PNG"),
                        help="plot every per-epoch training metric matching the glob PATTERN, per "
                        "trial, into PNG (e.g. 'sigma_*' for SDR's thresholds and mean sigmas)")
    args = parser.parse_args(argv)

    from cluster.storage import Storage
    from robust.results import minimal_norm, paired, summary, tables

    summaries, curves, certified, names, transfers = [], [], [], {}, []
    try:
        budgets = minimal_norm.parse_budgets(args.budgets)
        radii = tables.with_default_radii(tables.parse_radii(args.radii) if args.radii else ())
    except ValueError as err:
        parser.error(str(err))
    minimal: list = []  # minimal-norm attacks' distances per trial
    scores: list = []  # R2 / R4 per trial (launch/score.py)
    for path in args.paths:
        storage = Storage(path.rstrip("/"), args.endpoint)
        if storage.is_local and storage.filesystem.get_file_info(storage.root).type.name != "Directory":
            parser.error(f"no experiment at {path}: not a directory")
        experiment = storage.root.rsplit("/", 1)[-1]
        found = summary.summarize_experiment(storage.filesystem, storage.root, experiment)
        if not found:
            print(f"{path}: no completed trial with evaluation results yet", file=sys.stderr)
        summaries.extend(found)
        for s in found:
            for t in s.trials:
                names[t.trial] = f"{experiment}/{s.defense} {s.description} seed {t.seed}"
        curves.extend(summary.curve_points(storage.filesystem, storage.root))
        certified.extend(tables.certified_curves(storage.filesystem, storage.root, radii))
        minimal.extend(minimal_norm.minimal_norm_points(storage.filesystem, storage.root))
        scores.extend(tables.score_summaries(storage.filesystem, storage.root))
        transfers.append((path, storage.filesystem, storage.root))
    if not summaries and not certified and not scores:
        return 1  # nothing evaluated, certified or scored yet
    if summaries:
        _emit(args.format, "Accuracy [%] on the test split (mean ± std over seeds; best seed chosen on "
              "validation)", *summary.summary_rows(summaries))
        _emit(args.format, "Best models: accuracy [%] with 95% intervals (Clopper-Pearson; bootstrap where "
              "a stochastic model's scores are fractions), the validation metric that chose them, sanity flags",
              *summary.best_model_rows(summaries))
        if any(s.best.stochastic for s in summaries):
            print(f"note: {summary.STOCHASTIC_NOTE}")
        for path, fs, root in transfers:
            mine = [s for s in summaries if s.experiment == root.rsplit("/", 1)[-1]]
            header, rows = paired.eot_rows(mine, fs, root)
            if rows:
                _emit(args.format, "EOT samples: robust accuracy at S and 2S samples on the check subset "
                      "(S is enough where they agree within the paired 95% interval)", header, rows)
        header, rows = summary.paired_rows(summaries)
        if rows:
            _emit(args.format, "Paired comparison of the best models (exact McNemar test, same examples)",
                  header, rows)
    if curves:
        _emit(args.format, "Robust accuracy versus eps",
              ["model", "attack", "eps", "accuracy [%]", "n"],
              [[names.get(p["trial"], p["trial"]), p["attack"], f"{p['eps']:.4g}",
                f"{100 * p['accuracy']:.2f}", str(p["n"])] for p in sorted(
                  curves, key=lambda p: (p["trial"], p["attack"], p["eps"]))])
    for norm, values in budgets.items():
        header, rows = minimal_norm.minimal_norm_rows(minimal, names, norm, values)
        if rows:
            _emit(args.format, f"Minimal-norm attacks ({norm}): success [%] overall and within each budget, "
                  "median distance (examples correct when clean)", header, rows)
    for path, fs, root in transfers:
        header, rows = tables.transfer_rows(fs, root, names)
        if rows:
            _emit(args.format, f"Transfer attacks: target accuracy [%] on examples crafted on the source ({path})",
                  header, rows)
    if scores:
        _emit(args.format, "Robustness scores (Tibo et al.): mean R2 margin and the attack closest to the "
              "boundary (Table 2), mean R4", *tables.score_rows(scores, names))
    if args.plot_margins:
        if not any(s["r2"] for s in scores):
            print("no R2 scores to plot (run launch/score.py --scores r2)", file=sys.stderr)
            return 1
        tables.plot_margin_curves(scores, args.plot_margins, names)
        print(f"wrote {args.plot_margins}")
    if certified:
        _emit(args.format, "Certified accuracy [%] at radius (correct, the bound not abstaining, radius >= r; PREDICT: "
              "Cohen et al.'s, abstain counted as wrong)",
              *tables.certified_rows(certified, names, radii))
    if args.plot_certified:
        if not certified:
            print("no certification results to plot (run launch/certify.py)", file=sys.stderr)
            return 1
        tables.plot_certified(certified, args.plot_certified, names, radii)
        print(f"wrote {args.plot_certified}")
    if args.plot_noise:
        from robust.results.noise import noise_curves, plot_noise

        noise = []
        for path in args.paths:
            storage = Storage(path.rstrip("/"), args.endpoint)
            noise.extend(noise_curves(storage.filesystem, storage.root))
        if not noise:
            print("no learned noise scales to plot (train learn2perturb or pni)", file=sys.stderr)
            return 1
        plot_noise(noise, args.plot_noise, names)
        print(f"wrote {args.plot_noise}")
    if args.plot_metric:
        from robust.results.epochs import epoch_metric_curves, plot_epoch_metrics

        pattern, png = args.plot_metric
        metric_curves = []
        for path in args.paths:
            storage = Storage(path.rstrip("/"), args.endpoint)
            metric_curves.extend(epoch_metric_curves(storage.filesystem, storage.root, pattern))
        if not metric_curves:
            print(f"no per-epoch training metric matches {pattern!r}", file=sys.stderr)
            return 1
        plot_epoch_metrics(metric_curves, png, names, pattern)
        print(f"wrote {png}")
    if args.plot:
        if not curves:
            print("no eps-curve results to plot (evaluate with --eps-curve)", file=sys.stderr)
            return 1
        summary.plot_curves(curves, args.plot, names)
        print(f"wrote {args.plot}")
    return 0


def show(experiment: str, endpoint: Optional[str] = None) -> int:
    """Print the summary of one experiment (what the other launch scripts end with)."""
    return main([experiment] + (["--endpoint", endpoint] if endpoint else []))


if __name__ == "__main__":
    sys.exit(main())
