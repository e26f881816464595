"""What the launch scripts share: an argument parser whose errors are one line, exit 2.

Imports no Ray, so a script can refuse bad input before Ray is ever imported.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, List, Optional, Tuple


class UsageError(ValueError):
    """Bad input: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """``prog: error: message`` on one line and exit code 2 (argparse prints usage too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_and_resolve(parser: argparse.ArgumentParser, resolve: Callable[[argparse.Namespace], Any],
                      argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, Any]:
    """Parse ``argv`` and validate it with ``resolve``; bad input exits 2 with one line."""
    args = parser.parse_args(argv)
    try:
        return args, resolve(args)
    except ValueError as err:  # UsageError included
        parser.error(str(err))
        raise  # unreachable: parser.error exits
