#!/usr/bin/env python
"""Push a local experiment to S3, uploading only what is missing or changed.

    python launch/sync.py results/<experiment> s3://bucket/prefix [--endpoint URL]

The experiment lands at s3://bucket/prefix/<experiment>, where
``launch/summarize.py`` and any node of a cluster can read it.  Every object is
retried with backoff; nothing partial is ever visible; running it again after a
failure uploads only what is still missing.  Exit 2 on bad input, 1 when an
upload still fails after the retries (the local results are never touched).
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from cluster.cli import OneLineParser


def build_parser():
    p = OneLineParser(prog="sync.py", description="Push a local experiment to S3 (idempotent).")
    p.add_argument("experiment", help="local experiment folder, e.g. results/constant-smoke-...")
    p.add_argument("destination", help="s3://bucket/prefix; the experiment goes under it by its name")
    p.add_argument("--endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--attempts", type=int, default=4, help="tries per object (default 4)")
    p.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds, doubled each time")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from cluster.storage import Storage, StorageError
    from cluster.sync import SyncError, sync_experiment

    parser = build_parser()
    args = parser.parse_args(argv)
    local = os.path.abspath(args.experiment.rstrip("/"))
    if not os.path.isdir(local) or not os.path.exists(os.path.join(local, "manifest.json")):
        parser.error(f"{args.experiment} is not an experiment folder (no manifest.json)")
    if not args.destination.startswith("s3://"):
        parser.error(f"destination must be s3://bucket/prefix, got {args.destination!r}")
    if args.attempts < 1 or args.backoff < 0:
        parser.error("--attempts must be >= 1 and --backoff >= 0")
    dest = Storage(f"{args.destination.rstrip('/')}/{os.path.basename(local)}", args.endpoint)
    try:
        Storage(args.destination, args.endpoint).check()
    except StorageError as err:
        parser.error(str(err))
    try:
        report = sync_experiment(local, dest, attempts=args.attempts, backoff_s=args.backoff,
                                 log=lambda line: print(line, flush=True))
    except SyncError as err:
        print(f"sync.py: error: {err}; local results at {local} are intact, run again to resume",
              file=sys.stderr)
        return 1
    print(f"synced {local} -> {dest.display(dest.root)}: {len(report.uploaded)} uploaded, "
          f"{len(report.unchanged)} unchanged, {report.retries} retr{'y' if report.retries == 1 else 'ies'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
