"""Certification over Ray actors, and launch/certify.py's refusals."""
from __future__ import annotations


import pytest
import torch

from cluster.certification import CertifySettings, run_certification
from cluster.storage import Storage
from helpers import completed_trial
from launch_probe import probe
from robust.results.schema import read_kind
from robust.spec import TrialSpec


@pytest.fixture
def experiment(tmp_path, trained_digits_model):
    """An experiment with one completed trial whose checkpoint is the session's digits model."""
    spec = TrialSpec(defense="stn", dataset="digits", model="small-cnn", seed=1,
                     defense_config={"sigma": 0.25})
    return completed_trial(tmp_path, spec, trained_digits_model.state_dict())


def _certify(storage, root, source, **kw):
    settings = CertifySettings(sigma=0.25, n0=20, n=300, confidence=0.95, chunk=50, max_examples=12,
                               shard_size=5, **kw)
    done = run_certification([source], settings, storage, root, actors=kw.get("split", 1))
    table = read_kind(storage.filesystem, root, "certify")
    return done, table.sort_by("example").select(
        ["example", "prediction", "p1_lower", "p2_upper", "radius_renyi", "radius_cohen"]).to_pylist()


def test_samples_split_over_two_actors_give_the_unsplit_certificates(ray_local, experiment, tmp_path):
    storage, root, source = experiment
    done, split = _certify(storage, root, source, split=3)  # each image's 6 chunks on 3 jobs, 3 actors
    assert done == 12 and len(split) == 12
    other = Storage(str(tmp_path / "other"))
    _, whole = _certify(other, other.experiment("exp"), source)  # one job per stream, one actor
    assert split == whole
    # a re-run skips every written shard (3 files: 5 + 5 + 2 images)
    assert _certify(storage, root, source, split=3)[0] == 0
    files = sorted(p.name for p in (tmp_path / "exp" / "data" / "certify").rglob("*.parquet"))
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_early_stopping_spends_fewer_samples_and_certifies_what_it_claims(ray_local, experiment):
    storage, root, source = experiment
    settings = CertifySettings(sigma=0.25, n0=20, n=2000, confidence=0.95, chunk=50, max_examples=8,
                               shard_size=8, radius=0.1, early_stop=True)
    run_certification([source], settings, storage, root, actors=2)
    rows = read_kind(storage.filesystem, root, "certify").to_pylist()
    assert len(rows) == 8
    assert sum(r["samples_used"] for r in rows) < 8 * (20 + 2000)
    for r in rows:  # a certificate at the requested radius is reported only when it holds
        assert r["abstain"] or r["radius_renyi"] >= 0.0


def test_certify_refuses_bad_input_with_exit_2(experiment, tmp_path):
    path = str(tmp_path / "exp")
    cases = {
        "sigma <= 0": ([path, "--sigma", "0"], "sigma"),
        "n < n0": ([path, "--n", "10", "--n0", "100"], "n0"),
        "confidence above 1": ([path, "--confidence", "1.5"], "confidence"),
        "confidence 0": ([path, "--confidence", "0"], "confidence"),
        "unknown preset": ([path, "--preset", "huge"], "valid choices: stn, cohen"),
        "early stop without radius": ([path, "--early-stop"], "--early-stop needs --radius"),
        "no experiment": ([str(tmp_path / "none")], "no experiment at"),
    }
    before = sorted(p.name for p in tmp_path.rglob("*"))
    results = probe("certify", {k: v[0] for k, v in cases.items()})
    for name, (_, message) in cases.items():
        r = results[name]
        lines = r["stderr"].strip().splitlines()
        assert r["code"] == 2 and not r["ray"], (name, r)
        assert len(lines) == 1 and message in lines[0], (name, lines)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
