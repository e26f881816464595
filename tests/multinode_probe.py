"""A 2-trial search on a three-node Ray cluster on this machine, results on S3.

Run by tests/test_cluster_scale.py in its own interpreter (the test session
already holds a single-node Ray instance).  The head has no CPUs and the
`trial_driver` resource, so drivers run there and the two training workers
must land on the two worker nodes (1 CPU each).  Prints the worker nodes' ids
as JSON on the last line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

MB = 1024 ** 2


def main(storage: str, endpoint: str) -> None:
    from ray.cluster_utils import Cluster

    import tune
    from cluster.experiment import DRIVER_RESOURCE, run_experiment

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {DRIVER_RESOURCE: 10}, "object_store_memory": 80 * MB,
        "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=80 * MB) for _ in range(2)]
    cluster.wait_for_nodes()
    ids = [w.node_id for w in workers]
    try:
        args = tune.build_parser().parse_args([
            "--defense", "standard", "--seeds", "2", "--epochs", "1", "--max-test-examples", "32",
            "--storage", storage, "--endpoint", endpoint, "--name", "multi", "--address", cluster.address])
        run_experiment(tune.build_plan(args, tune.resolve(args)))
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(ids))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
