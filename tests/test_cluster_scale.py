"""Cluster scale: the cluster config, planning, S3 storage, sync, resume after a killed
driver, dead evaluation actors, secrets, and several nodes.  Every server and
cluster here is started by the test itself, on loopback."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
import yaml

from launch_probe import probe
from s3_server import free_port, s3_server

from cluster.storage import Storage
from cluster.sync import SyncError, sync_experiment
from robust.results.schema import read_kind

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- ray_cluster.yaml

def _validate(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_yaml_passes_rays_schema_and_broken_copies_fail():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    _validate(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("trial_driver", 0) > 0 and head["resources"].get("GPU", 0) == 0
    assert all("trial_driver" not in t["resources"] and t["resources"]["GPU"] >= 1
               for name, t in types.items() if name != config["head_node_type"])
    assert any("pip install" in c and "robust-runner" in c for c in config["setup_commands"])
    unknown = copy.deepcopy(config)
    unknown["max_wrokers"] = 3
    fractional = copy.deepcopy(config)
    next(t for n, t in fractional["available_node_types"].items() if n != "head")["resources"]["GPU"] = 0.5
    for broken in (unknown, fractional):
        with pytest.raises(Exception, match="not allowed|is not of type 'integer'"):
            _validate(broken)


# ---------------------------------------------------------------- planning and bad input

def test_dry_run_of_the_paper_preset_plans_wrn_on_cifar10_without_data_or_ray(tmp_path):
    data_dir = tmp_path / "data"
    env = {**os.environ, "ROBUST_DATA_DIR": str(data_dir), "RAY_TMPDIR": str(tmp_path / "ray")}
    results = probe("tune", {"paper": ["--defense", "constant", "--preset", "paper", "--dry-run",
                                       "--storage", str(tmp_path / "results"), "--gpu-tflops", "40"]}, env=env)
    r = results["paper"]
    assert r["code"] == 0, r
    assert not (tmp_path / "ray").exists()  # no Ray instance was started
    out = r["stdout"]
    assert "wrn-28-10" in out and "cifar10" in out and "10.5 GFLOPs" in out
    assert "1 configuration(s) x 5 seed(s) = 5" in out and "epochs per trial: 700" in out
    assert "4 worker(s) x 1 GPU = 4 GPU(s)" in out
    hours = float(out.split(" GPU-hours")[0].rsplit("= ", 1)[1])
    # 5 trials x 700 epochs x 45,000 images x 3 x 10.5 GFLOPs at 40 TFLOP/s, plus validation/evaluation
    assert 5 * 700 * 45000 * 3 * 10.49e9 / 40e12 / 3600 < hours < 60
    assert not data_dir.exists() and not (tmp_path / "results").exists()


def test_bad_storage_and_names_exit_2_with_one_line_and_write_nothing(tmp_path, monkeypatch):
    with s3_server(monkeypatch) as s3:
        s3.client().create_bucket(Bucket="results")
        (tmp_path / "results" / "taken").mkdir(parents=True)
        (tmp_path / "results" / "taken" / "manifest.json").write_text('{"plan": {}, "runs": []}')
        base = ["--defense", "standard", "--epochs", "1"]
        local = base + ["--storage", str(tmp_path / "results")]
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        cases = {
            "uppercase bucket": (base + ["--storage", "s3://Results/x"], "invalid S3 storage"),
            "no bucket": (base + ["--storage", "s3://"], "invalid S3 storage"),
            "double slash": (base + ["--storage", "s3://results//x"], "invalid S3 storage"),
            "missing bucket": (base + ["--storage", "s3://absent-bucket/x"], "bucket 'absent-bucket' does not exist"),
            "unreachable endpoint": (base + ["--storage", "s3://results/x", "--endpoint", dead], "is not reachable"),
            "existing name": (local + ["--name", "taken"], "already exists"),
            "resume without name": (local + ["--resume"], "--resume needs --name"),
            "resume unknown": (local + ["--name", "nothing-here", "--resume"], "no experiment 'nothing-here'"),
            "unknown scheduler": (local + ["--scheduler", "hyperband"], "valid choices: fifo, asha"),
            "asha without search": (local + ["--scheduler", "asha"], "needs a search"),
        }
        results = probe("tune", {k: v[0] for k, v in cases.items()}, env={**os.environ, **s3.env})
        for name, (_, message) in cases.items():
            r = results[name]
            lines = r["stderr"].strip().splitlines()
            assert r["code"] == 2, (name, r)
            assert len(lines) == 1 and message in lines[0], (name, lines)
        assert s3.objects("results") == []
        assert [b["Name"] for b in s3.client().list_buckets()["Buckets"]] == ["results"]
        assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["taken"]


def test_a_resume_with_another_configuration_is_refused(tmp_path):
    from cluster.manifest import write_manifest

    sys.path.insert(0, str(ROOT / "launch"))
    import tune

    args = tune.build_parser().parse_args(["--defense", "standard", "--storage", str(tmp_path), "--name", "e",
                                           "--epochs", "2"])
    plan = tune.build_plan(args, tune.resolve(args))
    storage = Storage(str(tmp_path))
    storage.filesystem.create_dir(storage.experiment("e"))
    write_manifest(storage, storage.experiment("e"), vars(plan))
    tune.check_name(plan, resume=True)  # the same configuration resumes
    changed = tune.build_parser().parse_args(["--defense", "standard", "--storage", str(tmp_path), "--name", "e",
                                              "--epochs", "3"])
    with pytest.raises(tune.UsageError, match="different configuration .*base_spec"):
        tune.check_name(tune.build_plan(changed, tune.resolve(changed)), resume=True)


# ---------------------------------------------------------------- sync

def _experiment(root: Path, files: int = 6) -> Path:
    exp = root / "exp"
    (exp / "data" / "attack").mkdir(parents=True)
    (exp / "manifest.json").write_text('{"plan": {}}')
    for i in range(files):
        (exp / "data" / "attack" / f"part-{i:05d}.parquet").write_bytes(os.urandom(2000 + i))
    return exp


def test_sync_stops_cleanly_when_the_endpoint_dies_and_resumes_with_only_the_missing(tmp_path, monkeypatch):
    exp = _experiment(tmp_path)
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    with s3_server(monkeypatch) as s3:
        s3.client().create_bucket(Bucket="bkt")
        storage = Storage("s3://bkt/pre/exp", s3.endpoint)
        uploaded = []

        def log(line):  # the endpoint goes away after the third upload
            uploaded.append(line)
            if len(uploaded) == 3:
                s3.stop()

        with pytest.raises(SyncError, match="after 3 attempts"):
            sync_experiment(str(exp), storage, attempts=3, backoff_s=0.05, timeout_s=2, log=log)
        assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before  # local results intact
        s3.start()
        first = {o["Key"]: o["ETag"] for o in s3.objects("bkt")}
        assert len(first) == 3
        report = sync_experiment(str(exp), storage, attempts=3, backoff_s=0.05)
        after = {o["Key"]: o["ETag"] for o in s3.objects("bkt")}
        assert sorted(report.uploaded) == sorted(k[len("pre/exp/"):] for k in after
                                                 if k not in first and not k.endswith((".sync/files.json", "/")))
        assert len(report.uploaded) == len(before) - 3 and len(report.unchanged) == 3
        assert all(after[k] == v for k, v in first.items())  # nothing uploaded twice
        for path, data in before.items():
            key = "pre/exp/" + str(path.relative_to(exp))
            assert s3.client().get_object(Bucket="bkt", Key=key)["Body"].read() == data
        again = sync_experiment(str(exp), storage)
        assert again.uploaded == [] and len(again.unchanged) == len(before)
        (exp / "data" / "attack" / "part-00001.parquet").write_bytes(os.urandom(2001))  # same size, new bytes
        changed = sync_experiment(str(exp), storage)
        assert changed.uploaded == ["data/attack/part-00001.parquet"]


def test_sync_cli_reports_failure_with_exit_1_and_bad_input_with_exit_2(tmp_path, monkeypatch):
    exp = _experiment(tmp_path, files=2)
    with s3_server(monkeypatch) as s3:
        s3.client().create_bucket(Bucket="bkt")
        env = {**os.environ, **s3.env}
        results = probe("sync", {"ok": [str(exp), "s3://bkt/pre"], "not an experiment": [str(tmp_path), "s3://bkt/x"],
                                 "local destination": [str(exp), str(tmp_path / "copy")],
                                 "missing bucket": [str(exp), "s3://nobucket/x"],
                                 "unreachable": [str(exp), "s3://bkt/pre", "--endpoint",
                                                 f"http://127.0.0.1:{free_port()}"]}, env=env)
        assert results["ok"]["code"] == 0
        assert len(s3.objects("bkt", "pre/exp/")) == 4  # 2 parts, manifest, sync record
        for name, message in (("not an experiment", "no manifest.json"), ("local destination", "must be s3://"),
                              ("missing bucket", "does not exist"), ("unreachable", "is not reachable")):
            lines = results[name]["stderr"].strip().splitlines()
            assert results[name]["code"] == 2 and len(lines) == 1 and message in lines[0], (name, lines)


# ---------------------------------------------------------------- evaluation actors that die

def _ray_children(name: str):
    """PIDs of this Ray session's worker processes titled ``ray::<name>`` (children of our raylet)."""
    import ray

    raylets = {p.process.pid for p in ray._private.worker._global_node.all_processes["raylet"]}
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmd.startswith(f"ray::{name}") and ppid in raylets:
            out.append(int(pid))
    return out


@pytest.mark.timeout(300)
def test_a_killed_evaluation_actor_is_retried_recorded_and_leaves_one_row_per_example(
        ray_local, tmp_path, trained_digits_model, digits):
    from cluster.evaluation import EvalSettings, ModelSource, plan_jobs, run_pool
    from cluster.records import STATE_FILE
    from robust.spec import TrialSpec

    spec = TrialSpec(defense="standard", dataset="digits", model="small-cnn", seed=1)
    ckpt = tmp_path / "exp" / "ckpt"
    ckpt.mkdir(parents=True)
    torch.save({"model": trained_digits_model.state_dict()}, ckpt / STATE_FILE)
    storage = Storage(str(tmp_path))
    root = storage.experiment("exp")
    source = ModelSource("t0", spec.to_dict(), checkpoint=str(ckpt))
    settings = EvalSettings(attacks=("fgsm", "pgd-40"), batch_size=16, shard_size=16, max_examples=96)
    jobs = plan_jobs([source], settings, storage, root, {"t0": len(digits.test)}, {"t0": digits.eps})
    killed = []

    def assassin():  # kill the first actor seen running a job, mid-run
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pids = _ray_children("EvalWorker.run")
            if pids:
                time.sleep(0.3)
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    thread = threading.Thread(target=assassin, daemon=True)
    thread.start()
    assert run_pool(jobs, [source], settings, storage, root, actors=1) == 96
    thread.join()
    assert killed, "no evaluation actor was seen running"
    events = read_kind(storage.filesystem, root, "events").to_pylist()
    assert len(events) >= 1 and all(e["event"] == "retry" and e["attempt"] == 2 for e in events)
    assert all("trial=t0" in e["subject"] for e in events)
    table = read_kind(storage.filesystem, root, "attack")
    for label in ("clean", "fgsm", "pgd-40"):
        rows = table.filter(pc.equal(table["attack"], label))
        assert sorted(rows["example"].to_pylist()) == sorted(set(rows["example"].to_pylist()))
        assert rows.num_rows == 96, label
    assert all(n for n in table["node"].to_pylist())


# ---------------------------------------------------------------- the whole path on S3, killed and resumed

@pytest.fixture
def short_tmp():
    """A short private directory for Ray's sockets and logs, removed afterwards."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    yield path
    for pid in _leftovers(path):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def _rows(storage, root, kind):
    return read_kind(storage.filesystem, root, kind).to_pylist()


def _leftovers(marker: str):
    """Processes started under our private Ray temp dir (ours to end, and only ours)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(pid))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_search_on_s3_survives_a_killed_driver_and_keeps_secrets_out(tmp_path, short_tmp):
    with s3_server() as s3:
        s3.client().create_bucket(Bucket="results")
        ray_tmp = Path(short_tmp)  # AF_UNIX socket paths must stay under 107 bytes
        env = {**os.environ, **s3.env, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1",
               "ROBUST_OBJECT_STORE_MB": "150"}
        storage = Storage("s3://results/runs", s3.endpoint)
        root = storage.experiment("scen")
        cmd = [sys.executable, "launch/tune.py", "--defense", "standard", "--seeds", "2", "--epochs", "6",
               "--max-concurrent", "1", "--max-test-examples", "64", "--storage", "s3://results/runs",
               "--name", "scen"]
        with open(tmp_path / "run1.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            snapshot = None
            deadline = time.time() + 600
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.5)
                trials = _rows(storage, root, "trials")
                done = [t["trial"] for t in trials if t["status"] == "completed"]
                epochs = {}
                for row in _rows(storage, root, "train"):
                    epochs.setdefault(row["trial"], []).append(row)
                running = [t for t in epochs if t not in done and len(epochs[t]) >= 2]
                if done and running:
                    snapshot = {"done": done[0], "running": running[0], "epochs": epochs,
                                "done_objects": {o["Key"]: o["LastModified"] for o in s3.objects("results")
                                                 if f"trial={done[0]}/" in o["Key"] and "/train/" in o["Key"]}}
                    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
                    break
            proc.wait(timeout=60)
        for pid in _leftovers(str(ray_tmp)):
            os.kill(pid, signal.SIGKILL)
        assert snapshot is not None, (tmp_path / "run1.log").read_text()[-3000:]
        assert len(snapshot["epochs"][snapshot["running"]]) < 6

        resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=900)
        (tmp_path / "run2.log").write_text(resumed.stdout + resumed.stderr)
        for pid in _leftovers(str(ray_tmp)):
            os.kill(pid, signal.SIGKILL)
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]

        trials = _rows(storage, root, "trials")
        assert sorted(t["trial"] for t in trials) == sorted({snapshot["done"], snapshot["running"]})
        assert all(t["status"] == "completed" and t["epochs_done"] == 6 for t in trials)
        train = _rows(storage, root, "train")
        for trial in (snapshot["done"], snapshot["running"]):
            epochs = sorted(r["epoch"] for r in train if r["trial"] == trial)
            assert epochs == [1, 2, 3, 4, 5, 6], (trial, epochs)  # no (trial, epoch) twice
        # the finished trial was not retrained: its epoch rows were never rewritten
        assert {o["Key"]: o["LastModified"] for o in s3.objects("results")
                if f"trial={snapshot['done']}/" in o["Key"] and "/train/" in o["Key"]} == snapshot["done_objects"]
        # the interrupted trial continued from its checkpoint: the epochs before the kill
        # (all but the last, whose checkpoint may not have been saved) are the same rows
        before = sorted(snapshot["epochs"][snapshot["running"]], key=lambda r: r["epoch"])[:-1]
        after = {r["epoch"]: r for r in train if r["trial"] == snapshot["running"]}
        for row in before:
            assert after[row["epoch"]]["epoch_seconds"] == row["epoch_seconds"]
            assert after[row["epoch"]]["train_loss"] == row["train_loss"]
        # evaluation: exactly one row per (trial, attack, example), every row from a named node
        attack = read_kind(storage.filesystem, root, "attack")
        keys = list(zip(attack["trial"].to_pylist(), attack["attack"].to_pylist(), attack["example"].to_pylist()))
        assert len(keys) == len(set(keys)) and attack.num_rows > 0
        assert all(attack["node"].to_pylist())
        objects = [o for o in s3.objects("results", "runs/scen/data/attack/") if o["Key"].endswith(".parquet")]
        assert len(objects) == 2 * 4  # 2 trials x (clean, fgsm, pgd-20, sanity-large-eps) x 1 shard

        summary = subprocess.run([sys.executable, "launch/summarize.py", "s3://results/runs/scen"], cwd=ROOT,
                                 env=env, capture_output=True, text=True, timeout=300)
        (tmp_path / "summary.log").write_text(summary.stdout + summary.stderr)
        assert summary.returncode == 0, summary.stderr[-3000:]
        assert "pgd-20" in summary.stdout and "standard" in summary.stdout

        secret = s3.secret.encode()
        for obj in s3.objects("results"):
            body = s3.client().get_object(Bucket="results", Key=obj["Key"])["Body"].read()
            assert secret not in body, obj["Key"]
        scanned = 0
        for path in [*tmp_path.glob("*.log"), *ray_tmp.rglob("*")]:
            if path.is_file() and not path.is_symlink():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                scanned += 1
                assert secret not in data, path
        assert scanned > 10  # Ray's own logs were there to scan


# ---------------------------------------------------------------- several nodes

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_trials_train_on_two_nodes_and_share_s3_storage(short_tmp):
    import json

    with s3_server() as s3:
        s3.client().create_bucket(Bucket="shared")
        env = {**os.environ, **s3.env, "RAY_TMPDIR": short_tmp}
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_probe.py"), "s3://shared/exp",
                               s3.endpoint], cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
        for pid in _leftovers(short_tmp):
            os.kill(pid, signal.SIGKILL)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        worker_nodes = json.loads(proc.stdout.strip().splitlines()[-1])
        storage = Storage("s3://shared/exp", s3.endpoint)
        root = storage.experiment("multi")
        trials = _rows(storage, root, "trials")
        assert len(trials) == 2 and all(t["status"] == "completed" for t in trials)
        nodes = [t["node"].rsplit("/", 1)[1] for t in trials]
        assert len(set(nodes)) == 2, nodes  # the two trials trained on different nodes
        assert all(any(w.startswith(n) for w in worker_nodes) for n in nodes), (nodes, worker_nodes)
        train = _rows(storage, root, "train")
        assert {r["node"] for r in train} == {t["node"] for t in trials}
        attack = read_kind(storage.filesystem, root, "attack")
        assert attack.num_rows > 0 and set(attack["trial"].to_pylist()) == {t["trial"] for t in trials}
        assert len(s3.objects("shared", "exp/multi/tune/")) > 0  # Tune state and checkpoints on S3 too
