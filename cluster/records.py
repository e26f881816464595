"""Rows of our own results that the Ray adapters write: trial rows and epoch rows.

Pure pyarrow on top of :mod:`robust.results.schema`; no Ray import, so the
launch scripts and tests can use it too.
"""
from __future__ import annotations

import io
import json
import math
import time
from typing import Any, Dict, List, Optional

import pyarrow as pa
import torch

from cluster.storage import Storage
from robust.results.schema import TRIAL_SCHEMA, file_metadata, train_path, trial_path, write_table
from robust.spec import TrialSpec


def node_name() -> str:
    """The Ray node id of this process when it runs inside Ray, else the host name.

    Ray is imported only when a driver or worker already imported it, so the
    launch scripts and plain tests stay Ray-free.
    """
    import socket
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    return socket.gethostname()


def write_trial_row(storage: Storage, root: str, trial: str, spec: TrialSpec, status: str, *,
                    reason: str = "", node: str = "", history: Optional[List[Dict[str, Any]]] = None,
                    checkpoint: str = "", metric: str = "") -> None:
    """Write the trial's row (replacing its previous one).

    ``metric`` is the defense's selection metric (its tuning module's ``METRIC``, the
    key Tune optimised); the row records its name and its value at the last epoch of
    ``history``, the last value Tune saw (NaN before the first epoch).  An empty name
    (a model that was not tuned, e.g. an external one) is stored as null.
    """
    last = history[-1] if history else {}
    row = {
        "trial": trial, "config_id": spec.config_id(), "seed": spec.seed, "defense": spec.defense,
        "status": status, "reason": reason, "node": node, "config": json.dumps(spec.to_dict()),
        "epochs_done": int(last.get("epoch", 0)),
        "val_acc": float(last.get("val_acc", math.nan)),
        "val_pgd_acc": float(last.get("val_pgd_acc", math.nan)),
        "metric": metric or None,
        "metric_value": float(last.get(metric, math.nan)) if metric else math.nan,
        "checkpoint": checkpoint, "updated": time.time(),
    }
    table = pa.Table.from_pylist([row], schema=TRIAL_SCHEMA)
    write_table(storage.filesystem, trial_path(root, trial), table, file_metadata(spec.to_dict()))


def write_epoch_rows(storage: Storage, root: str, trial: str, spec: TrialSpec,
                     history: List[Dict[str, Any]], node: str = "") -> None:
    """The whole per-epoch history so far (rewritten each epoch; one deterministic file).

    ``node`` is recorded on rows that do not carry one yet: epochs trained before a
    restart keep the node that trained them.
    """
    for h in history:
        h.setdefault("node", node)
    rows = [{**h, "config_id": spec.config_id(), "seed": spec.seed} for h in history]
    table = pa.Table.from_pylist(rows)
    write_table(storage.filesystem, train_path(root, spec.defense, trial), table,
                file_metadata(spec.to_dict()))


STATE_FILE = "state.pt"


def load_state(storage: Storage, checkpoint_dir: str) -> Dict[str, Any]:
    """The TrainState dict saved in a checkpoint directory of ``storage``."""
    with storage.filesystem.open_input_file(f"{checkpoint_dir}/{STATE_FILE}") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)
