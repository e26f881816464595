"""Results: the Parquet schema and atomic writers (schema.py), and summaries (summary.py)."""
