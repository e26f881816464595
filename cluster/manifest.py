"""The experiment manifest: resolved plan, code version and package versions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Dict

import pyarrow.fs as pafs

from cluster.storage import Storage
from robust.results.schema import SCHEMA_VERSION

PACKAGES = ("torch", "torchvision", "ray", "pyarrow", "numpy", "scikit-learn", "boto3")


def code_version() -> str:
    """The git commit of this checkout (with '+dirty' when modified), else the package version."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        try:
            return metadata.version("robust-runner")
        except metadata.PackageNotFoundError:
            return "unknown"


def package_versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def describe_domain(value: Any) -> Any:
    """JSON form of a Ray Tune search domain (choice or range); plain values pass through."""
    if hasattr(value, "categories"):
        return {"choice": list(value.categories)}
    if hasattr(value, "lower") and hasattr(value, "upper"):
        sampler = type(getattr(value, "sampler", None)).__name__
        return {"range": [value.lower, value.upper], "sampler": sampler}
    return str(value)


#: the plan fields that define an experiment: a resume must match them; resources
#: (workers, address, failures, scheduler) may change between runs
IDENTITY = ("defense", "preset", "base_spec", "search", "samples", "seeds", "metric", "mode")


def plan_identity(plan: Any) -> Dict[str, Any]:
    """The identity fields of a plan (an ExperimentPlan or its manifest dict), in JSON form."""
    data = plan if isinstance(plan, dict) else vars(plan)
    return {k: json.loads(json.dumps(data.get(k), sort_keys=True, default=describe_domain)) for k in IDENTITY}


def read_manifest(storage: Storage, root: str) -> Dict[str, Any] | None:
    """The experiment's manifest, or None when there is no experiment at ``root``."""
    fs = storage.filesystem
    path = f"{root}/manifest.json"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_manifest(storage: Storage, root: str, plan: Dict[str, Any]) -> None:
    """Write ``<root>/manifest.json``; on a resumed run the first manifest is kept and
    the new run is appended to its ``runs`` list."""
    fs = storage.filesystem
    path = f"{root}/manifest.json"
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code_version": code_version(),
           "packages": package_versions(), "command": plan.get("command", "")}
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read().decode())
        manifest.setdefault("runs", []).append(run)
    else:
        manifest = {"schema_version": SCHEMA_VERSION, "plan": plan, "runs": [run]}
    data = json.dumps(manifest, indent=2, sort_keys=True, default=describe_domain).encode()
    if storage.is_local:
        tmp = f"{root}/.manifest.json.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)
