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

import argparse
import sys
from typing import List, Optional

FORMATS = ("table", "markdown", "csv")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(prog="summarize.py", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="experiment folders or s3:// prefixes")
    parser.add_argument("--format", default="table", choices=FORMATS)
    parser.add_argument("--endpoint", default=None, help="S3-compatible endpoint URL")
    args = parser.parse_args(argv)

    from cluster.storage import Storage
    from robust.results import summary

    summaries = []
    for path in args.paths:
        storage = Storage(path.rstrip("/"), args.endpoint)
        if storage.filesystem.get_file_info(storage.root).type.name != "Directory" and storage.is_local:
            parser.error(f"no experiment at {path}: not a directory")
        found = summary.summarize_experiment(storage.filesystem, storage.root,
                                             storage.root.rsplit("/", 1)[-1])
        if not found:
            print(f"{path}: no completed trial with evaluation results yet", file=sys.stderr)
        summaries.extend(found)
    if not summaries:
        return 1
    header, rows = summary.summary_rows(summaries)
    if args.format == "markdown":
        print(summary.format_markdown(header, rows))
    elif args.format == "csv":
        print(summary.format_csv(header, rows))
    else:
        summary.print_rich_table(header, rows, "Accuracy [%] on the test split "
                                 "(mean ± std over seeds; best seed chosen on validation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
