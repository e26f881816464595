"""Evaluation sharded over Ray actors, and launch/evaluate.py as a user runs it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
from launch_probe import probe

from cluster.evaluation import EvalSettings, ModelSource, evaluate_job, finalize_checks, plan_jobs, run_pool
from cluster.records import STATE_FILE
from cluster.storage import Storage
from robust.evaluation.protocol import evaluate_shard
from robust.evaluation.suite import parse_attacks
from robust.results.schema import read_kind
from robust.spec import TrialSpec

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ("fgsm", "pgd-5")


@pytest.fixture
def checkpointed(tmp_path, trained_digits_model):
    """A trial checkpoint of the session's trained digits model, as training leaves it."""
    spec = TrialSpec(defense="standard", dataset="digits", model="small-cnn", seed=3)
    ckpt = tmp_path / "exp" / "tune" / "ckpt"
    ckpt.mkdir(parents=True)
    torch.save({"model": trained_digits_model.state_dict()}, ckpt / STATE_FILE)
    storage = Storage(str(tmp_path))
    return storage, storage.experiment("exp"), ModelSource("t0", spec.to_dict(), checkpoint=str(ckpt))


def _rows(storage, root):
    table = read_kind(storage.filesystem, root, "attack")
    keep = [c for c in table.column_names if c not in ("shard",)]
    return sorted(map(tuple, zip(*[table[c].to_pylist() for c in keep])))


def test_two_actors_give_exactly_the_rows_of_one_unsharded_pass(ray_local, checkpointed, digits,
                                                                 trained_digits_model):
    storage, root, source = checkpointed
    settings = EvalSettings(attacks=ATTACKS, batch_size=32, shard_size=32, max_examples=96)
    jobs = plan_jobs([source], settings, storage, root, {"t0": len(digits.test)}, {"t0": digits.eps})
    assert [(j.start, j.stop) for j in jobs] == [(0, 32), (32, 64), (64, 96)]
    assert run_pool(jobs, [source], settings, storage, root, actors=2) == 96
    table = read_kind(storage.filesystem, root, "attack")
    # the same computation in one process, one pass over all 96 examples
    unsharded = evaluate_shard(trained_digits_model.eval(), digits.test, range(96),
                               parse_attacks(list(ATTACKS), digits.eps), digits.eps, torch.device("cpu"),
                               seed=3, batch_size=32)
    for label, cols in unsharded.items():
        part = table.filter(pc.equal(table["attack"], label)).sort_by("example")
        assert part["example"].to_pylist() == cols["example"], label
        for column in ("prediction", "correct", "robust", "vote_prediction"):
            assert part[column].to_pylist() == cols[column], (label, column)
    # a re-run skips every written shard; a retried shard overwrites its own files
    assert plan_jobs([source], settings, storage, root, {"t0": len(digits.test)}, {"t0": digits.eps}) == []
    before = _rows(storage, root)
    evaluate_job(jobs[1], source, settings, storage, root)
    assert _rows(storage, root) == before
    flags = finalize_checks(storage, root, [source])["t0"]
    assert {f.name for f in flags} >= {"zero-gradients", "large-eps-not-broken", "iterative-weaker-than-fgsm"}
    assert read_kind(storage.filesystem, root, "checks").num_rows == len(flags)


FACTORY = textwrap.dedent("""
    from robust.models import create_model

    def digits_cnn():
        return create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)

    def digits_lenet():
        return create_model("lenet", num_classes=10, in_channels=1, image_size=8)
""")



@pytest.fixture
def external(tmp_path, trained_digits_model):
    (tmp_path / "factories.py").write_text(FACTORY)
    torch.save(trained_digits_model.state_dict(), tmp_path / "weights.pt")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return tmp_path, env


def test_evaluate_refuses_bad_input_with_exit_2(external):
    tmp_path, env = external
    base = [str(tmp_path / "exp"), "--model-factory", "factories:digits_cnn", "--weights",
            str(tmp_path / "weights.pt"), "--dataset", "digits"]
    cases = {
        "unknown attack": (base + ["--attacks", "fgsm,pgd-x"], "unknown attack 'pgd-x'; valid choices"),
        "negative eps": (base + ["--attacks", "pgd-5:eps=-0.1"], "eps must be"),
        "eps values < 0": (base + ["--eps-curve", "pgd-5", "--eps-values", "0.1,-0.2"], "eps values must be >= 0"),
        "steps < 1": (base + ["--attacks", "pgd-0"], "steps must be >= 1"),
        "architecture mismatch": ([a.replace("digits_cnn", "digits_lenet") for a in base],
                                  "cannot load the model of external-"),
        "not an experiment": ([str(tmp_path / "none")], "no experiment at"),
    }
    results = probe("evaluate", {k: v[0] for k, v in cases.items()}, env=env)
    for name, (_, message) in cases.items():
        r = results[name]
        lines = r["stderr"].strip().splitlines()
        assert r["code"] == 2 and not r["ray"], (name, r)
        assert len(lines) == 1 and message in lines[0], (name, lines)
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_an_external_model_end_to_end(external):
    tmp_path, env = external
    proc = subprocess.run([sys.executable, "launch/evaluate.py", str(tmp_path / "exp"), "--model-factory",
                           "factories:digits_cnn", "--weights", str(tmp_path / "weights.pt"), "--dataset",
                           "digits", "--attacks", "fgsm,pgd-5", "--eps-curve", "pgd-5", "--eps-values",
                           "0.05,0.1,0.2", "--max-examples", "64", "--shard-size", "32", "--batch-size", "32",
                           "--actors", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "95% intervals (Clopper-Pearson" in proc.stdout and "Robust accuracy versus eps" in proc.stdout
    storage = Storage(str(tmp_path / "exp"))
    table = read_kind(storage.filesystem, storage.root, "attack")
    assert set(table["attack"].to_pylist()) >= {"clean", "fgsm", "pgd-5", "pgd-5:eps=0.05", "pgd-5:eps=0.2"}
    assert table.filter(pc.equal(table["attack"], "fgsm")).num_rows == 64
    png = tmp_path / "curve.png"
    plot = subprocess.run([sys.executable, "launch/summarize.py", str(tmp_path / "exp"), "--plot", str(png),
                           "--format", "csv"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = plot.stdout.split("# Robust accuracy versus eps", 1)[1].strip().splitlines()[1:]
    curve = [line for line in section if ",pgd-5," in line]
    accuracies = [float(line.split(",")[3]) for line in curve]
    assert len(accuracies) == 4 and accuracies == sorted(accuracies, reverse=True)  # eps 0 .. 0.2


def test_a_larger_max_examples_reevaluates_the_short_last_shard_and_a_new_shard_size_is_refused(
        checkpointed, digits):
    storage, root, source = checkpointed
    sizes, eps = {"t0": len(digits.test)}, {"t0": digits.eps}
    small = EvalSettings(attacks=("fgsm",), batch_size=16, shard_size=32, max_examples=10)
    jobs = plan_jobs([source], small, storage, root, sizes, eps)
    assert [(j.start, j.stop) for j in jobs] == [(0, 10)]
    evaluate_job(jobs[0], source, small, storage, root)
    assert plan_jobs([source], small, storage, root, sizes, eps) == []
    # 40 examples: shard 0 now spans 0-31, so the 10-example shard is evaluated again, whole
    larger = EvalSettings(attacks=("fgsm",), batch_size=16, shard_size=32, max_examples=40)
    jobs = plan_jobs([source], larger, storage, root, sizes, eps)
    assert [(j.start, j.stop) for j in jobs] == [(0, 32), (32, 40)]
    for job in jobs:
        evaluate_job(job, source, larger, storage, root)
    table = read_kind(storage.filesystem, root, "attack")
    for label in ("clean", "fgsm"):
        examples = table.filter(pc.equal(table["attack"], label))["example"].to_pylist()
        assert len(examples) == 40 and len(set(examples)) == 40, label  # each example once
    assert plan_jobs([source], larger, storage, root, sizes, eps) == []
    # fewer examples again: the written shards hold more than asked, nothing is replaced by less
    assert plan_jobs([source], small, storage, root, sizes, eps) == []
    # another shard size would re-run shard 0 as 0-63 beside the written 32-39, or place
    # shard 1 at 64-95 beside it: refused either way
    for n in (64, 96):
        other = EvalSettings(attacks=("fgsm",), batch_size=16, shard_size=64, max_examples=n)
        with pytest.raises(ValueError, match="shard size 64"):
            plan_jobs([source], other, storage, root, sizes, eps)
