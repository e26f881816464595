"""Results files and the summary computed from them."""
from __future__ import annotations

import json
from statistics import mean, stdev

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cluster.storage import Storage, check_local_creatable
from robust.results import summary
from robust.results.schema import (ATTACK_SCHEMA, SCHEMA_VERSION, TRIAL_SCHEMA, attack_path,
                                   file_metadata, read_kind, trial_path, write_table)
from robust.evaluation.protocol import shard_positions
from robust.spec import TrialSpec


def _spec(seed, bound=0.2):
    return TrialSpec(defense="constant", dataset="digits", model="small-cnn", seed=seed,
                     defense_config={"bound": bound, "copies": 5})


def _write_trial(fs, root, trial, spec, val_pgd, accuracy, n=50):
    row = {"trial": trial, "config_id": spec.config_id(), "seed": spec.seed, "defense": spec.defense,
           "status": "completed", "reason": "", "node": "n", "config": json.dumps(spec.to_dict()),
           "epochs_done": 3, "val_acc": 0.9, "val_pgd_acc": val_pgd, "checkpoint": "", "updated": 0.0}
    write_table(fs, trial_path(root, trial), pa.Table.from_pylist([row], schema=TRIAL_SCHEMA),
                file_metadata(spec.to_dict()))
    for attack, acc in accuracy.items():
        k = round(acc * n)
        # two shards, to check that shards merge into the per-trial accuracy
        for shard, rng in enumerate(shard_positions(n, 30)):
            correct = [i < k for i in rng]
            m = len(rng)
            table = pa.table({"example": list(rng), "label": [0] * m, "prediction": [0] * m,
                              "correct": correct, "vote_prediction": [0] * m, "vote_correct": correct,
                              "attacked": [True] * m, "robust": correct, "eps": [0.1] * m,
                              "eot_samples": [1] * m, "stochastic": [False] * m, "zero_grad": [False] * m,
                              "prob_like": [False] * m, "distance": [0.0] * m, "draws": [1] * m,
                              "draws_correct": [int(c) for c in correct], "queries": [None] * m,
                              "classifier": ["deployed"] * m, "check": [True] * m, "node": ["n0"] * m, "config_id": [spec.config_id()] * m,
                              "seed": [spec.seed] * m, "shard": [shard] * m}, schema=ATTACK_SCHEMA)
            if shard == 1:  # written before schema 4: no verdict counts (read back as one draw each)
                table = table.drop_columns(["draws", "draws_correct", "queries", "classifier", "check"])
            write_table(fs, attack_path(root, "constant", trial, attack, shard), table,
                        file_metadata(spec.to_dict()))


@pytest.fixture
def experiment(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "exp")
    accs = {"t0": (0.70, {"clean": 0.96, "fgsm": 0.70, "pgd-20": 0.60}),
            "t1": (0.80, {"clean": 0.94, "fgsm": 0.74, "pgd-20": 0.66}),
            "t2": (0.60, {"clean": 0.98, "fgsm": 0.64, "pgd-20": 0.50})}
    for seed, (trial, (val, acc)) in enumerate(accs.items()):
        _write_trial(fs, root, trial, _spec(seed), val, acc)
    _write_trial(fs, root, "other", _spec(0, bound=0.4), 0.5, {"clean": 0.9, "fgsm": 0.8, "pgd-20": 0.9})
    return fs, root, accs


def test_write_is_atomic_and_deterministic(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    path = attack_path(root, "constant", "t0", "pgd-20", 3)
    assert path.endswith("data/attack/defense=constant/trial=t0/attack=pgd-20/part-00003.parquet")
    table = pa.table({"example": [1, 2]}, schema=pa.schema([("example", pa.int64())]))
    write_table(fs, path, table, {"schema_version": "1"})
    write_table(fs, path, table, {"schema_version": "1"})  # a retry overwrites, never duplicates
    folder = tmp_path / "data/attack/defense=constant/trial=t0/attack=pgd-20"
    assert sorted(p.name for p in folder.iterdir()) == ["part-00003.parquet"]  # no temp file left
    meta = pq.read_schema(path).metadata
    assert meta[b"schema_version"] == b"1"


def test_files_carry_schema_version_and_run_config(experiment):
    fs, root, _ = experiment
    meta = pq.read_schema(trial_path(root, "t0")).metadata
    assert int(meta[b"schema_version"]) == SCHEMA_VERSION
    assert json.loads(meta[b"run_config"])["defense_config"]["copies"] == 5


def test_shards_merge_to_the_unsharded_answer(experiment):
    fs, root, accs = experiment
    table = read_kind(fs, root, "attack")
    assert set(table.column_names) >= {"defense", "trial", "attack", "example", "correct"}
    pc = pa.compute
    rows = table.filter(pc.and_(pc.equal(table["trial"], "t1"), pc.equal(table["attack"], "fgsm")))
    assert sorted(rows["example"].to_pylist()) == list(range(50))  # each example exactly once
    assert mean(rows["correct"].to_pylist()) == pytest.approx(accs["t1"][1]["fgsm"])


def test_summary_mean_std_over_seeds_and_best_seed_by_validation(experiment):
    fs, root, accs = experiment
    found = {s.description: s for s in summary.summarize_experiment(fs, root, "exp")}
    s = found["bound=0.2 copies=5"]
    assert s.seeds == [0, 1, 2]
    for attack in ("clean", "fgsm", "pgd-20"):
        assert s.accuracy[attack] == pytest.approx([a[1][attack] for a in accs.values()])
    # the worst case is the per-example AND: here the examples correct under PGD are the
    # first k, which are correct under the weaker attacks too
    assert s.accuracy[summary.WORST] == pytest.approx(s.accuracy["pgd-20"])
    # best by validation PGD (t1, seed 1), not by the test numbers (t2 has the best clean)
    assert s.best_seed == 1 and s.best.accuracy("pgd-20") == pytest.approx(0.66)
    vals = [100 * a[1]["pgd-20"] for a in accs.values()]
    header, rows = summary.summary_rows([s])
    assert rows[0][header.index("pgd-20")] == f"{mean(vals):.2f} ± {stdev(vals):.2f}"
    assert header[4:8] == ["clean", "fgsm", "pgd-20", summary.WORST]


def test_best_model_table_has_exact_binomial_intervals(experiment):
    fs, root, _ = experiment
    found = {s.description: s for s in summary.summarize_experiment(fs, root, "exp")}
    header, rows = summary.best_model_rows([found["bound=0.2 copies=5"]])
    cell = rows[0][header.index("pgd-20")]  # 33 of 50 correct
    assert cell == "66.00 [51.2, 78.8]", cell  # Clopper-Pearson 95% for 33/50


def test_paired_test_between_models_on_the_same_examples(experiment):
    fs, root, _ = experiment
    header, rows = summary.paired_rows(summary.summarize_experiment(fs, root, "exp"))
    assert len(rows) == 1
    # other (pgd 0.9 -> 45 right, worst case = clean&fgsm&pgd = 40 right) vs t1 (33 right)
    assert rows[0][header.index("only A right")] == "7" or rows[0][header.index("only B right")] == "7"


@pytest.mark.parametrize("fmt", ["markdown", "csv"])
def test_formats(experiment, fmt):
    fs, root, _ = experiment
    header, rows = summary.summary_rows(summary.summarize_experiment(fs, root, "exp"))
    text = summary.format_markdown(header, rows) if fmt == "markdown" else summary.format_csv(header, rows)
    assert len(text.splitlines()) == (4 if fmt == "markdown" else 3)
    assert "pgd-20" in text.splitlines()[0]


def test_config_id_ignores_the_seed_only():
    assert _spec(0).config_id() == _spec(4).config_id()
    assert _spec(0).config_id() != _spec(0, bound=0.4).config_id()


def test_storage_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_local_creatable(str(tmp_path / "file" / "below"))
    check_local_creatable(str(tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()  # checking creates nothing
    s3 = Storage("s3://bucket/some/prefix", endpoint="http://127.0.0.1:9")
    assert s3.root == "bucket/some/prefix" and not s3.is_local
    assert s3.display(s3.experiment("e")) == "s3://bucket/some/prefix/e"


def test_stochastic_scores_worst_case_includes_clean_and_vote_rule():
    """Per example, the score is k of R draws; an attack's accuracy is the mean of min(clean,
    attack), so an example misclassified clean is not robust even when a lucky draw classifies
    its adversarial point; the worst case is the minimum; the vote worst case needs a majority
    of draws correct under clean and every attack."""
    k_clean, k_pgd = [10, 10, 2, 0], [10, 3, 9, 10]
    vote_clean, vote_pgd = [True, True, False, False], [True, False, True, True]
    attacks = pa.table({"trial": ["t"] * 8, "attack": ["clean"] * 4 + ["pgd-20"] * 4,
                        "example": [0, 1, 2, 3] * 2, "correct": vote_clean + vote_pgd,
                        "vote_correct": vote_clean + vote_pgd, "stochastic": [True] * 8,
                        "draws": [10] * 8, "draws_correct": k_clean + k_pgd})
    result = summary.trial_results(attacks, [], pa.table({"trial": [], "flag": [], "tripped": []}))["t"]
    assert result.accuracy("clean") == pytest.approx((1 + 1 + 0.2 + 0) / 4)
    assert result.accuracy("pgd-20") == pytest.approx((1 + 0.3 + 0.2 + 0) / 4)  # not (1 + .3 + .9 + 1) / 4
    assert result.accuracy(summary.WORST) == pytest.approx(result.accuracy("pgd-20"))
    assert result.vote_accuracy(summary.WORST_VOTE) == pytest.approx(0.25)
    lo, hi = result.interval(summary.WORST)
    assert lo <= result.accuracy(summary.WORST) <= hi and (lo, hi) != (0.0, 1.0)
    s = summary.ConfigSummary("exp", "pni", "c", "default", [result], result)
    header, rows = summary.best_model_rows([s])
    assert summary.WORST_VOTE in header and rows[0][header.index(summary.WORST_VOTE)] == "25.00"
    # McNemar counts an example as right where the majority of its draws is
    assert summary.paired_rows([s, s])[1][0][4:6] == ["0", "0"]


def test_best_seed_is_the_argmax_of_the_defenses_own_metric(tmp_path):
    """A defense selected on val_eot_pgd_acc: the summary picks the seed with the best value of
    that metric (stored with the trial), not the one with the best plain PGD accuracy."""
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "exp")
    for seed, (val_pgd, val_eot) in enumerate([(0.9, 0.2), (0.5, 0.6), (0.7, 0.4)]):
        spec = _spec(seed)
        _write_trial(fs, root, f"t{seed}", spec, val_pgd, {"clean": 0.9, "pgd-20": 0.5})
        row = {**read_kind(fs, root, "trials").filter(pa.compute.equal(
            read_kind(fs, root, "trials")["trial"], f"t{seed}")).to_pylist()[0]}
        row.update(metric="val_eot_pgd_acc", metric_value=val_eot)
        row = {k: v for k, v in row.items() if k in TRIAL_SCHEMA.names}
        write_table(fs, trial_path(root, f"t{seed}"), pa.Table.from_pylist([row], schema=TRIAL_SCHEMA),
                    file_metadata(spec.to_dict()))
    s, = summary.summarize_experiment(fs, root, "exp")
    assert s.best_seed == 1 and s.best.metric == "val_eot_pgd_acc"
    header, rows = summary.best_model_rows([s])
    assert rows[0][header.index("selected by")] == "val_eot_pgd_acc 60.00"
