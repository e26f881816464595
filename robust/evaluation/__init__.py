"""Evaluation: attack suites (suite.py), the per-example protocol (protocol.py),
sanity checks (checks.py) and statistics (stats.py)."""
