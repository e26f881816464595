"""The results layout and its atomic Parquet writer.

One experiment is one folder (or object-store prefix)::

    <root>/manifest.json
    <root>/data/trials/part-<trial>.parquet                       one row per trial
    <root>/data/train/defense=<d>/trial=<t>/part-0.parquet        one row per epoch
    <root>/data/attack/defense=<d>/trial=<t>/attack=<a>/part-<shard>.parquet
                                                                  one row per example
    <root>/data/scores/defense=<d>/trial=<t>/score=<r2|r4>/part-<shard>.parquet
                                                                  one row per example
    <root>/data/transfer/source=<s>/trial=<t>/attack=<a>/part-<shard>.parquet
                                          target t on examples crafted on source s

Each kind is its own pyarrow dataset with hive partitioning (partition values
live in the path, not in the files).  File names are deterministic, so a
retried shard overwrites its file instead of duplicating it; files are written
to a hidden temporary name and renamed (on object stores a single PUT), so a
reader never sees half a file.  Every file carries the schema version and the
run's configuration in its metadata.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, Mapping

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMA_VERSION = 4

ATTACK_SCHEMA = pa.schema([
    ("example", pa.int64()),      # stable index of the example in its source split
    ("label", pa.int64()),
    ("prediction", pa.int64()),   # one draw, recomputed from the adversarial input
    ("correct", pa.bool_()),
    ("vote_prediction", pa.int64()),  # majority vote over m draws (= prediction if deterministic)
    ("vote_correct", pa.bool_()),
    ("attacked", pa.bool_()),     # false where a cascade skipped an already-broken example
    ("robust", pa.bool_()),       # worst case: correct clean and under every attack so far
    ("eps", pa.float64()),
    ("eot_samples", pa.int64()),
    ("stochastic", pa.bool_()),   # repeated forward passes of the model differ
    ("zero_grad", pa.bool_()),    # the clean input's loss gradient is exactly zero
    ("prob_like", pa.bool_()),    # the clean outputs are in [0,1] and sum to 1
    ("distance", pa.float64()),   # ||x_adv - x|| in the attack's norm (0 for clean rows)
    # schema 4: the verdict's counts, from which the summary recomputes every rule
    ("draws", pa.int64()),        # R fresh draws the verdict took (1: deterministic; 0: not attacked)
    ("draws_correct", pa.int64()),  # k of the R draws classified the row's input correctly
    ("queries", pa.int64()),      # model queries per example of a black-box attack (null: not counted)
    ("classifier", pa.string()),  # what was evaluated: the deployed classifier, or 'base' when asked
    ("check", pa.bool_()),        # every bounded attack attacked this example whatever the others did
                                  # (independent: all; cascade: the check subset); the flags compare there
    ("config_id", pa.string()),
    ("seed", pa.int64()),
    ("shard", pa.int64()),
    ("node", pa.string()),        # the Ray node (or host) that computed the row
])

TRANSFER_SCHEMA = pa.schema([   # a target model's rows on a source model's adversarial examples
    ("example", pa.int64()),
    ("label", pa.int64()),
    ("prediction", pa.int64()),   # the target's prediction (one draw) on the source's x_adv
    ("correct", pa.bool_()),
    ("vote_prediction", pa.int64()),
    ("vote_correct", pa.bool_()),
    ("source_prediction", pa.int64()),  # the source's own prediction on its x_adv
    ("source_correct", pa.bool_()),
    ("eps", pa.float64()),
    ("distance", pa.float64()),
    ("stochastic", pa.bool_()),   # the target's repeated forward passes differ
    ("config_id", pa.string()),   # the target's
    ("seed", pa.int64()),         # the target's
    ("source_seed", pa.int64()),
    ("shard", pa.int64()),
    ("node", pa.string()),
])

TRIAL_SCHEMA = pa.schema([
    ("trial", pa.string()),
    ("config_id", pa.string()),
    ("seed", pa.int64()),
    ("defense", pa.string()),
    ("status", pa.string()),      # running | completed | stopped (ASHA) | nan | error
    ("reason", pa.string()),
    ("node", pa.string()),
    ("config", pa.string()),      # the resolved TrialSpec as JSON
    ("epochs_done", pa.int64()),
    ("val_acc", pa.float64()),
    ("val_pgd_acc", pa.float64()),  # PGD accuracy (validation split), whatever the selection metric
    # the defense's selection metric (its tuning module's METRIC, what Tune optimised) and its
    # last value on the validation split; null name: no metric (an external model)
    ("metric", pa.string()),
    ("metric_value", pa.float64()),
    ("checkpoint", pa.string()),
    ("updated", pa.float64()),
])

SCORE_SCHEMA = pa.schema([      # per-example robustness scores (robust.scores; score in the path)
    ("example", pa.int64()),
    ("label", pa.int64()),
    ("prediction", pa.int64()),   # f(x), the label the score is about (type-2 scores are label-agnostic)
    ("value", pa.float64()),      # r2: the margin mu(x) (L2); r4: R4(x) in [0, 1] (NaN: no sample in any ball)
    ("found", pa.bool_()),        # r2: some attack changed the label; r4: some eps ball held a sample
    ("closest", pa.string()),     # r2: the attack whose boundary point was closest (Table 2); r4: ""
    ("distance_fgsm", pa.float64()),     # r2: boundary distance per attack (inf: it failed); r4: null
    ("distance_pgd", pa.float64()),
    ("distance_deepfool", pa.float64()),
    ("samples", pa.int64()),      # r4: autoencoder samples per example; r2: null
    ("eps_used", pa.int64()),     # r4: eps of Sigma with a non-empty S_eps(x); r2: null
    ("agreement", pa.float64()),  # r4: fraction of all samples keeping the label; r2: null
    ("sample_distance", pa.float64()),  # r4: mean ||x' - x||_2 of the samples; r2: null
    ("stochastic", pa.bool_()),   # repeated forward passes differ (scores are then of single draws)
    ("config_id", pa.string()),
    ("seed", pa.int64()),
    ("shard", pa.int64()),
    ("node", pa.string()),
])

CHECK_SCHEMA = pa.schema([
    ("flag", pa.string()),
    ("tripped", pa.bool_()),
    ("value", pa.float64()),
    ("detail", pa.string()),
])

EVENT_SCHEMA = pa.schema([
    ("event", pa.string()),       # retry: a job re-run after its actor died
    ("subject", pa.string()),     # which job (trial, shard, ...)
    ("attempt", pa.int64()),
    ("detail", pa.string()),
    ("node", pa.string()),
    ("time", pa.float64()),
])

PARTITIONS = {
    "events": pa.schema([]),
    "certify": pa.schema([("defense", pa.string()), ("trial", pa.string()), ("sigma", pa.string())]),
    "checks": pa.schema([("defense", pa.string()), ("trial", pa.string())]),
    "attack": pa.schema([("defense", pa.string()), ("trial", pa.string()), ("attack", pa.string())]),
    "transfer": pa.schema([("source", pa.string()), ("trial", pa.string()), ("attack", pa.string())]),
    "train": pa.schema([("defense", pa.string()), ("trial", pa.string())]),
    "scores": pa.schema([("defense", pa.string()), ("trial", pa.string()), ("score", pa.string())]),
    "trials": pa.schema([]),
}


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p != "")


def attack_path(root: str, defense: str, trial: str, attack: str, shard: int) -> str:
    return join(root, "data", "attack", f"defense={defense}", f"trial={trial}", f"attack={attack}",
                f"part-{shard:05d}.parquet")


def transfer_path(root: str, source: str, target: str, attack: str, shard: int) -> str:
    """Rows of ``target`` on the examples crafted on ``source`` (a trial id) under ``attack``."""
    return join(root, "data", "transfer", f"source={source}", f"trial={target}", f"attack={attack}",
                f"part-{shard:05d}.parquet")


def score_path(root: str, defense: str, trial: str, score: str, shard: int) -> str:
    return join(root, "data", "scores", f"defense={defense}", f"trial={trial}", f"score={score}",
                f"part-{shard:05d}.parquet")


def certify_path(root: str, defense: str, trial: str, sigma: float, shard: int) -> str:
    return join(root, "data", "certify", f"defense={defense}", f"trial={trial}", f"sigma={sigma:g}",
                f"part-{shard:05d}.parquet")


def checks_path(root: str, defense: str, trial: str) -> str:
    return join(root, "data", "checks", f"defense={defense}", f"trial={trial}", "part-0.parquet")


def train_path(root: str, defense: str, trial: str) -> str:
    return join(root, "data", "train", f"defense={defense}", f"trial={trial}", "part-0.parquet")


def event_path(root: str, name: str) -> str:
    return join(root, "data", "events", f"part-{name}.parquet")


def trial_path(root: str, trial: str) -> str:
    return join(root, "data", "trials", f"part-{trial}.parquet")


def file_metadata(run_config: Mapping[str, Any]) -> Dict[str, str]:
    return {"schema_version": str(SCHEMA_VERSION), "run_config": json.dumps(run_config, default=str)}


def write_table(fs: pafs.FileSystem, path: str, table: pa.Table, metadata: Mapping[str, str]) -> None:
    """Write ``table`` to ``path`` atomically: no reader ever sees a partial file."""
    meta = {**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}}
    table = table.replace_schema_metadata(meta)
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    if fs.type_name == "local":
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        with fs.open_output_stream(tmp) as sink:
            pq.write_table(table, sink)
        fs.move(tmp, path)  # rename(2): atomic on POSIX
    else:
        # An object store makes an object visible only when its upload completes.
        with fs.open_output_stream(path) as sink:
            pq.write_table(table, sink)


def read_kind(fs: pafs.FileSystem, root: str, kind: str) -> pa.Table:
    """All rows of one kind (attack, train, trials) of an experiment, partition columns included.

    An experiment without rows of that kind gives an empty table.  A run in
    progress replaces some files (the per-epoch history, a trial's row) while
    they are read: on an object store the listing may then give the old size of
    a replaced object, and the read fails.  Such a read is retried from a fresh
    listing (every object is always whole, so a fresh listing reads cleanly).
    """
    base = join(root, "data", kind)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        return pa.table({})
    partitioning = ds.partitioning(PARTITIONS[kind], flavor="hive") if len(PARTITIONS[kind]) else None
    schema = _dataset_schema(kind)
    for attempt in range(READ_ATTEMPTS):
        try:
            dataset = ds.dataset(base, filesystem=fs, format="parquet", partitioning=partitioning, schema=schema)
            return dataset.to_table()
        except (OSError, pa.ArrowInvalid):
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


READ_ATTEMPTS = 4


def _dataset_schema(kind: str):
    """The full schema a kind is read with, where it has grown over schema versions: files
    written before a column existed read back with that column null (the readers say
    what null means, e.g. robust.results.verdict for the verdict's counts)."""
    grown = {"attack": ATTACK_SCHEMA, "trials": TRIAL_SCHEMA}.get(kind)
    if grown is None:
        return None
    return pa.unify_schemas([grown, PARTITIONS[kind]])
