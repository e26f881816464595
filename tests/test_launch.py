"""The launch scripts as a user runs them: bad input is refused before Ray, and the
default command runs end to end on the embedded dataset with a local Ray instance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from launch_probe import probe

ROOT = Path(__file__).resolve().parents[1]

BAD_INPUTS = {
    "unknown defense": (["--defense", "nope"], "unknown defense 'nope'; valid choices: constant"),
    "unknown dataset": (["--defense", "constant", "--dataset", "imagenet"], "valid choices: cifar10"),
    "unknown model": (["--defense", "constant", "--model", "vgg99"], "valid choices: cnn7"),
    "unknown preset": (["--defense", "constant", "--preset", "huge"], "valid choices: smoke, paper"),
    "bound b <= 0": (["--defense", "constant", "--set", "bound=0"], "bound b must be > 0"),
    "negative bound": (["--defense", "constant", "--set", "bound=-0.1"], "bound b must be > 0"),
    "K < 1": (["--defense", "constant", "--set", "copies=0"], "K must be an integer >= 1"),
    "epochs < 1": (["--defense", "constant", "--epochs", "0"], "--epochs must be >= 1"),
    "unknown setting": (["--defense", "constant", "--set", "kk=3"], "invalid --set"),
    "storage below a file": (["--defense", "constant", "--storage", "{tmp}/afile/results"], "is a file"),
}



def _tree(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_bad_input_exits_2_with_one_line_before_importing_ray(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    before = _tree(tmp_path)
    cases = {name: [a.replace("{tmp}", str(tmp_path)) for a in argv] + (
        [] if "--storage" in argv else ["--storage", str(tmp_path / "results")])
        for name, (argv, _) in BAD_INPUTS.items()}
    results = probe("tune", cases)
    for name, (_, message) in BAD_INPUTS.items():
        r = results[name]
        assert r["code"] == 2, (name, r)
        assert not r["ray"], f"{name}: Ray was imported before the input was validated"
        lines = r["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tune.py: error: "), (name, lines)
        assert message in lines[0], (name, lines[0])
    assert _tree(tmp_path) == before  # nothing written


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_default_command_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "launch/tune.py", "--defense", "constant",
                           "--storage", str(tmp_path), "--name", "e2e"],
                          cwd=ROOT, capture_output=True, text=True, timeout=450, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "e2e"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["plan"]["defense"] == "constant" and manifest["runs"][0]["packages"]["torch"]
    trials = ds.dataset(root / "data" / "trials", format="parquet").to_table().to_pylist()
    assert len(trials) == 4 and {t["status"] for t in trials} == {"completed"}
    assert len({t["config_id"] for t in trials}) == 4  # distinct configurations drawn
    attack = ds.dataset(root / "data" / "attack", format="parquet", partitioning="hive").to_table()
    assert set(attack["attack"].to_pylist()) == {"clean", "fgsm", "pgd-20", "sanity-large-eps"}
    evaluated = attack.filter(pc.invert(pc.equal(attack["attack"], "sanity-large-eps")))
    assert evaluated.num_rows == 4 * 3 * 360  # every test example of every trial under every attack
    checks = ds.dataset(root / "data" / "checks", format="parquet", partitioning="hive").to_table()
    assert len(set(checks["trial"].to_pylist())) == 4  # sanity flags stored for every trial
    train = ds.dataset(root / "data" / "train", format="parquet", partitioning="hive").to_table()
    assert sorted(set(train["epoch"].to_pylist())) == [1, 2, 3, 4]
    assert "Accuracy [%] on the test split" in proc.stdout and "pgd-20" in proc.stdout

    summary = subprocess.run([sys.executable, "launch/summarize.py", str(root), "--format", "csv"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    lines = summary.stdout.strip().splitlines()
    assert lines[1].startswith("experiment,defense,config,seeds,clean,fgsm,pgd-20,worst-case")
    assert all(line.startswith("e2e,constant,") for line in lines[2:6])  # one row per configuration
    assert "95% intervals (Clopper-Pearson" in summary.stdout and "McNemar" in summary.stdout
