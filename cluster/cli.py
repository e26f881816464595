"""What the launch scripts share: an argument parser whose errors are one line, exit 2.

Imports no Ray, so a script can refuse bad input before Ray is ever imported.
"""
from __future__ import annotations

import argparse


class UsageError(ValueError):
    """Bad input: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """``prog: error: message`` on one line and exit code 2 (argparse prints usage too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")
