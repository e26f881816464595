#!/usr/bin/env python
"""Print paper-style tables from one or more experiments' results.

    python launch/summarize.py results/<experiment> [more experiments ...] [--format table|markdown|csv]

Reads only the Parquet files (locally or from s3://bucket/prefix/<experiment>):
per defense and configuration, accuracy clean and under each attack as
mean +- std over seeds, and the best seed's whole row (best by the validation
PGD accuracy).  Several experiments print side by side, e.g. a defense next to
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
    args = parser.parse_args(argv)

    from cluster.storage import Storage
    from robust.results import summary

    summaries, curves, certified, names = [], [], [], {}
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
        certified.extend(summary.certified_curves(storage.filesystem, storage.root))
    if not summaries:
        return 1
    _emit(args.format, "Accuracy [%] on the test split (mean ± std over seeds; best seed chosen on "
          "validation)", *summary.summary_rows(summaries))
    _emit(args.format, "Best models: accuracy [%] with 95% Clopper-Pearson intervals, sanity flags",
          *summary.best_model_rows(summaries))
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
    if certified:
        _emit(args.format, "Certified accuracy [%] at radius (not abstained, correct, radius >= r)",
              *summary.certified_rows(certified, names))
    if args.plot_certified:
        if not certified:
            print("no certification results to plot (run launch/certify.py)", file=sys.stderr)
            return 1
        summary.plot_certified(certified, args.plot_certified, names)
        print(f"wrote {args.plot_certified}")
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
