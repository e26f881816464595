"""Issue 14, section 4: additive-noise defenses are evaluated as the classifier they deploy
(STN Algorithm 1), the base network only when asked and labelled; Cohen's CERTIFY abstain
is never certified; certified accuracy at user radii; early stopping has several looks and
refuses radii it cannot reach."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from helpers import completed_trial, small_model
from scipy.special import ndtri
from torch import nn

from cluster.certification import CertifySettings, certificate_rows
from cluster.evaluation import EvalSettings, ModelSource, ShardJob, evaluate_job, load_model
from cluster.storage import Storage
from robust.attacks.smoothed_pgd import AdditiveNoise, SmoothedPGD, sample_noise
from robust.attacks.verdict import is_stochastic
from robust.certify import ABSTAIN, Smooth, certified_accuracy, certify_from_counts, largest_radius
from robust.data import create_dataset
from robust.defenses import create_defense, defense_names
from robust.defenses.base import classifier_name
from robust.results import tables
from robust.results.schema import certify_path, file_metadata, read_kind, write_table
from robust.spec import TrialSpec

ROOT = Path(__file__).resolve().parents[1]
#: Defenses whose deployed classifier adds input noise around the trained network.
ADDITIVE_NOISE = {"stn"}


@pytest.fixture(scope="module")
def synthetic():
    return create_dataset("synthetic")


# --- the deployed classifier -------------------------------------------------------------------

@pytest.mark.parametrize("name", defense_names())
def test_every_defense_deploys_its_model_unless_it_adds_noise(name, synthetic):
    defense = create_defense(name, eps_data=synthetic.eps)
    model = defense.prepare_model(small_model(synthetic)).eval()
    deployed = defense.deployed(model)
    x = synthetic.test.batch(torch.arange(8))[0]
    if name not in ADDITIVE_NOISE:
        assert deployed is model and classifier_name(deployed) == "deployed"
        return
    # the noisy classifier of Algorithm 1 around the very same network, stochastic at inference
    assert isinstance(deployed, AdditiveNoise) and deployed.model is model
    assert is_stochastic(deployed, x) and not is_stochastic(model, x)
    assert classifier_name(deployed) == f"noisy(n=1,sigma={defense.config.sigma:g},{defense.config.noise})"


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_one_noisy_copy_is_the_model_on_x_plus_r(noise, synthetic):
    model = small_model(synthetic).eval()
    x = synthetic.test.batch(torch.arange(8))[0]
    torch.manual_seed(5)
    out = AdditiveNoise(model, 0.3, noise)(x)
    torch.manual_seed(5)
    assert torch.equal(out, model(x + sample_noise(x, noise, 0.3)))


def test_n_noisy_copies_predict_their_majority_with_the_soft_gradient(synthetic):
    model, n = small_model(synthetic).eval(), 7
    x = synthetic.test.batch(torch.arange(6))[0].requires_grad_()
    torch.manual_seed(2)
    out = AdditiveNoise(model, 0.5, copies=n)(x)
    # the same n draws, by hand: the majority class over n hard votes (STN Algorithm 1, step 7)
    torch.manual_seed(2)
    xs = x.unsqueeze(0).expand(n, *x.shape).reshape(n * x.shape[0], *x.shape[1:])
    logits = model(xs + sample_noise(xs, "gaussian", 0.5)).view(n, x.shape[0], -1)
    votes = logits.argmax(-1)
    counts = F.one_hot(votes, logits.shape[-1]).sum(0)
    assert torch.equal(out.argmax(1), counts.argmax(1))
    assert torch.equal(out.argmax(1), torch.mode(votes, 0).values) or bool((counts.max(1).values * 2 <= n).any())
    assert not bool(((out >= 0) & (out <= 1)).all())  # log-frequencies: the prob-like flag stays quiet
    # straight through: the gradient is that of log(mean softmax) over the same copies (SmoothAdv)
    grad, = torch.autograd.grad(out.gather(1, counts.argmax(1, keepdim=True)).sum(), x)
    soft = torch.logsumexp(F.log_softmax(logits, -1), 0) - math.log(n)
    expected, = torch.autograd.grad(soft.gather(1, counts.argmax(1, keepdim=True)).sum(), x)
    torch.testing.assert_close(grad, expected)
    assert grad.abs().sum() > 0


def test_smoothed_pgd_never_adds_noise_twice(synthetic):
    model = small_model(synthetic).eval()
    deployed = create_defense("stn", eps_data=synthetic.eps, sigma=0.25).deployed(model)
    same = SmoothedPGD(eps=0.5, norm="l2", sigma=0.25, steps=2, eot_samples=2)
    assert same.target(deployed) is deployed  # the deployed classifier, its own noise inside
    wrapped = same.target(model)
    assert isinstance(wrapped, AdditiveNoise) and wrapped.model is model
    with pytest.raises(ValueError, match="added on top"):
        SmoothedPGD(eps=0.5, norm="l2", sigma=0.5).target(deployed)
    with pytest.raises(ValueError, match="added on top"):
        SmoothedPGD(eps=0.5, norm="l2", sigma=0.25, noise="laplace").target(deployed)


# --- rows score the deployed classifier; the base network only when asked ----------------------

@pytest.fixture
def stn_experiment(tmp_path, trained_digits_model):
    """A completed stn trial whose checkpoint is the session's (noise-free) digits network, with a
    sigma so large that its noisy classifier is clearly worse than the network itself."""
    spec = TrialSpec(defense="stn", dataset="digits", model="small-cnn", seed=1,
                     defense_config={"sigma": 1.0})
    return completed_trial(tmp_path, spec, trained_digits_model.state_dict())


def test_rows_score_the_noisy_classifier_and_base_rows_are_apart(stn_experiment, digits, trained_digits_model):
    storage, root, source = stn_experiment
    common = dict(attacks=("fgsm",), batch_size=16, shard_size=16, max_examples=16, votes=8,
                  large_eps_examples=0)
    deployed, base = EvalSettings(**common), EvalSettings(classifier="base", **common)
    for settings in (deployed, base):
        model = load_model(source, storage, digits, settings.classifier, settings.noisy_copies)
        evaluated = settings.evaluated_source(source, model)
        evaluate_job(ShardJob(evaluated.trial, 0, 0, 16), evaluated, settings, storage, root, model, digits)
    table = read_kind(storage.filesystem, root, "attack")
    rows = {t: table.filter(pa.compute.equal(table["trial"], t)).to_pylist() for t in ("t0", "t0:base")}
    clean = {t: [r for r in rows[t] if r["attack"] == "clean"] for t in rows}
    # deployed: the stochastic noisy classifier, judged on R fresh draws
    assert {r["classifier"] for r in rows["t0"]} == {"noisy(n=1,sigma=1,gaussian)"}
    assert all(r["stochastic"] and r["draws"] == 8 for r in clean["t0"])
    # base: apart (its own trial key), labelled, deterministic, and the network's own predictions
    assert {r["classifier"] for r in rows["t0:base"]} == {"base"}
    x, y, _ = digits.test.batch(torch.arange(16))
    with torch.no_grad():
        network = trained_digits_model(x).argmax(1).tolist()
    assert [r["prediction"] for r in sorted(clean["t0:base"], key=lambda r: r["example"])] == network
    assert not any(r["stochastic"] for r in clean["t0:base"])
    base_acc = np.mean([r["correct"] for r in clean["t0:base"]])
    noisy_acc = np.mean([r["draws_correct"] / r["draws"] for r in clean["t0"]])
    assert noisy_acc < base_acc - 0.2  # the rows score what is deployed, not the base network


def test_load_model_deploys_by_default_and_gives_the_network_when_asked(stn_experiment, digits):
    storage, _, source = stn_experiment
    deployed = load_model(source, storage, digits, noisy_copies=3)
    assert isinstance(deployed, AdditiveNoise) and deployed.copies == 3 and deployed.sigma == 1.0
    assert not isinstance(load_model(source, storage, digits, classifier="base"), AdditiveNoise)
    with pytest.raises(ValueError, match="valid choices: deployed, base"):
        EvalSettings(attacks=("fgsm",), classifier="cohen-predict")


# --- certification: abstain is never certified; PREDICT beside it -------------------------------

def _fixed(select, estimate):
    return lambda num, first, stream: np.array(select if stream == "select" else estimate)


# 45 of 100 votes for class 0: the pair test predicts (p1_lower 0.35 > p2_upper 0.18), while
# Cohen's CERTIFY abstains (its p_A lower bound 0.37 <= 1/2).
CLEAR_PAIR = [45, 10, 9, 9, 9, 9, 9]
# two classes almost tied: the pair test and PREDICT both abstain
TIED = [31, 29, 10, 10, 10, 10, 0]


def test_cohen_abstain_is_not_certified_even_where_the_pair_test_predicts():
    cert = certify_from_counts(_fixed([9, 1, 0, 0, 0, 0, 0], CLEAR_PAIR), 10, 100, 0.95, 0.25)
    assert cert.prediction == 0 and cert.radius["renyi"] > 0 and cert.radius["cohen"] == 0
    assert cert.abstains("cohen") and not cert.abstains("renyi")
    assert not cert.certified_at(0.0, "cohen") and cert.certified_at(0.0, "renyi")
    np.testing.assert_array_equal(certified_accuracy([cert], [0], [0.0], "cohen"), [0.0])
    np.testing.assert_array_equal(certified_accuracy([cert], [0], [0.0], "renyi"), [1.0])
    assert cert.predict == 0  # Cohen's PREDICT on the same samples: 45 vs 10 is no tie


def _write_certificates(storage, root, certs, labels, old_style=False):
    settings = CertifySettings(sigma=0.25, n0=10, n=100, confidence=0.95)
    spec = TrialSpec(defense="stn", dataset="digits", model="small-cnn")
    table = certificate_rows([(i, y, c, 0.1, "here") for i, (c, y) in enumerate(zip(certs, labels))], spec, 0,
                             settings)
    if old_style:  # as written before abstain_<bound> and PREDICT existed
        table = table.drop([c for c in table.column_names if c.startswith("abstain_") or c.startswith("predict")])
    write_table(storage.filesystem, certify_path(root, "stn", "t0", 0.25, 0), table, file_metadata({}))
    return table


@pytest.mark.parametrize("old_style", [False, True])
def test_certified_table_never_counts_an_abstain(tmp_path, old_style):
    storage = Storage(str(tmp_path))
    root = storage.experiment("exp")
    certs = [certify_from_counts(_fixed([9, 1, 0, 0, 0, 0, 0], counts), 10, 100, 0.95, 0.25)
             for counts in (CLEAR_PAIR, [95, 5, 0, 0, 0, 0, 0], TIED)]
    rows = _write_certificates(storage, root, certs, [0, 0, 0], old_style).to_pylist()
    if not old_style:
        assert [r["abstain_cohen"] for r in rows] == [True, False, True]
        assert [r["abstain_renyi"] for r in rows] == [False, False, True]
        assert [r["predict"] for r in rows] == [0, 0, ABSTAIN] and [r["predict_correct"] for r in rows] == [
            True, True, False]  # abstain counts as wrong
    curves = {c["bound"]: c for c in tables.certified_curves(storage.filesystem, root, (0.0, 0.1))}
    assert curves["cohen"]["accuracy"][0] == pytest.approx(1 / 3)   # only the 95-of-100 image
    assert curves["renyi"]["accuracy"][0] == pytest.approx(2 / 3)
    assert curves["cohen"]["abstain"] == pytest.approx(2 / 3)
    assert curves["cohen"]["predict"] == (None if old_style else pytest.approx(2 / 3))
    header, table_rows = tables.certified_rows(list(curves.values()), {}, (0.0, 0.1))
    assert "PREDICT [%]" in header and header[-2:] == ["r=0", "r=0.1"]


# --- summarize --radii ---------------------------------------------------------------------------

def test_radii_are_shown_besides_the_defaults_and_bad_ones_exit_2(tmp_path, monkeypatch, capsys):
    assert tables.with_default_radii(tables.parse_radii("0.1,0.3,0.5")) == (0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0)
    storage = Storage(str(tmp_path))
    root = storage.experiment("exp")
    certs = [certify_from_counts(_fixed([10, 0, 0, 0, 0, 0, 0], [99, 1, 0, 0, 0, 0, 0]), 10, 100, 0.95, 0.25)]
    _write_certificates(storage, root, certs, [0])
    curves = tables.certified_curves(storage.filesystem, root, tables.with_default_radii((0.1, 0.3)))
    header, rows = tables.certified_rows(curves, {}, tables.with_default_radii((0.1, 0.3)))
    shown = dict(zip(header, rows[[r[2] for r in rows].index("renyi")]))
    radius = certs[0].radius["renyi"]
    assert shown["r=0.1"] == ("100.0" if radius >= 0.1 else "0.0") and shown["r=0.3"] == (
        "100.0" if radius >= 0.3 else "0.0") and "r=0.25" in shown
    monkeypatch.syspath_prepend(str(ROOT / "launch"))
    import summarize

    for bad in ("0.1,abc", "-0.5", "inf", "0.1,,0.2"):
        with pytest.raises(SystemExit) as exit_info:
            summarize.main([str(tmp_path / "exp"), "--radii", bad])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and "--radii" in lines[0], (bad, lines)


# --- early stopping: several looks, reachable radii only ------------------------------------------

class Constant(nn.Module):
    def __init__(self, label: int, classes: int = 10):
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x):
        return F.one_hot(torch.full((x.shape[0],), self.label), self.classes).float()


@pytest.mark.parametrize("chunk", [400, 16])
def test_early_stopping_on_the_default_preset_has_several_looks(chunk, monkeypatch):
    """stn preset (n0 = n = 100) on 8x8 inputs, whose throughput chunk is 400: the looks follow n."""
    smooth = Smooth(Constant(2), num_classes=10, sigma=0.25, chunk=chunk)
    looks = []
    sample = smooth.sample_counts
    monkeypatch.setattr(smooth, "sample_counts", lambda x, n, image_id, first_chunk=0, stream="estimate": (
        looks.append(n) if stream == "estimate" else None, sample(x, n, image_id, first_chunk, stream))[1])
    cert = smooth.certify(torch.rand(1, 8, 8), n0=100, n=100, confidence=0.95, radius=0.2, early_stop=True)
    assert len(looks) >= 2 and set(looks) == {10}
    assert cert.certified_at(0.2, "renyi") and cert.samples_used < 100 + 100


def test_an_unreachable_radius_is_refused_naming_the_largest():
    # Cohen's bound, one look: sigma * Phi^-1(alpha^(1/n)) = 0.472 (the number)
    assert largest_radius(100, 0.95, 0.25, "cohen") == pytest.approx(0.25 * ndtri(0.05 ** 0.01))
    assert round(largest_radius(100, 0.95, 0.25, "cohen"), 3) == 0.472
    # with early stopping's 10 looks each at alpha / 10, and the renyi bound it decides by
    largest = largest_radius(100, 0.95, 0.25, "renyi", looks=10)
    def all_top(num, first, stream):
        return np.array([num, 0])

    with pytest.raises(ValueError, match=f"largest reachable radius is {math.floor(largest * 1000) / 1000:.3f}"):
        certify_from_counts(all_top, 10, 100, 0.95, 0.25, radius=0.5, early_stop=True)
    # just below it: accepted, and certified at the last look when every sample is on the top class
    cert = certify_from_counts(all_top, 10, 100, 0.95, 0.25, radius=largest * 0.999, early_stop=True)
    assert cert.certified_at(largest * 0.999, "renyi") and cert.samples_used == 10 + 100


def test_certify_cli_refuses_an_unreachable_radius_in_one_line(stn_experiment, monkeypatch):
    storage, root, _ = stn_experiment
    monkeypatch.syspath_prepend(str(ROOT / "launch"))
    import certify

    exp = str(Path(storage.root) / "exp")
    cases = {
        ("--early-stop", "--radius", "0.5", "--sigma", "0.25"): "largest reachable radius is 0.317",
        ("--early-stop", "--radius", "0.5", "--sigma", "0.25", "--bound", "cohen"): "is 0.407",
        ("--early-stop", "--radius", "0.1", "--bound", "laplace"): "valid choices: renyi, cohen, pixeldp",
        ("--radius", "0.1", "--bound", "cohen"): "--bound chooses",
    }
    for argv, message in cases.items():
        with pytest.raises(certify.UsageError, match=message):
            certify.resolve(certify.build_parser().parse_args([exp, *argv]))
    assert certify.resolve(certify.build_parser().parse_args([exp, "--early-stop", "--radius", "0.3"]))["plans"]


def test_evaluate_cli_options(stn_experiment, monkeypatch):
    storage, _, _ = stn_experiment
    monkeypatch.syspath_prepend(str(ROOT / "launch"))
    import evaluate

    exp = str(Path(storage.root) / "exp")
    cases = {
        ("--classifier", "cohen-predict"): "Cohen's PREDICT is reported by launch/certify.py",
        ("--noisy-copies", "0"): "--noisy-copies must be >= 1",
        ("--attacks", "smoothed-pgd-2:sigma=0.25"): "sigma 1",  # the deployed noise is sigma 1
    }
    for argv, message in cases.items():
        with pytest.raises(evaluate.UsageError, match=message):
            evaluate.resolve(evaluate.build_parser().parse_args([exp, *argv]))
    r = evaluate.resolve(evaluate.build_parser().parse_args([exp, "--classifier", "base", "--attacks", "fgsm"]))
    assert [s.trial for s in r["sources"]] == ["t0:base"] and r["settings"].classifier == "base"
    r = evaluate.resolve(evaluate.build_parser().parse_args([exp, "--noisy-copies", "3",
                                                              "--attacks", "smoothed-pgd-2:sigma=1.0"]))
    assert [s.trial for s in r["sources"]] == ["t0:n=3"] and r["settings"].noisy_copies == 3
    # a defense that adds no noise ignores n: its rows are the default deployment's
    plain = EvalSettings(attacks=("fgsm",), noisy_copies=3)
    source = ModelSource("t1", {})
    assert plain.evaluated_source(source, nn.Linear(2, 2)) is source


# --- end to end: evaluate, certify --early-stop, summarize --radii ----------------------------------

def test_end_to_end_on_a_tiny_stn_experiment(ray_local, stn_experiment, monkeypatch, capsys):
    storage, root, _ = stn_experiment
    monkeypatch.syspath_prepend(str(ROOT / "launch"))
    import certify
    import evaluate

    exp = str(Path(storage.root) / "exp")
    small = ["--attacks", "fgsm", "--max-examples", "8", "--batch-size", "8", "--shard-size", "8", "--votes", "4",
             "--actors", "1"]
    assert evaluate.main([exp, *small]) == 0
    assert certify.main([exp, "--max", "4", "--early-stop", "--radius", "0.3", "--actors", "1"]) == 0
    capsys.readouterr()
    import summarize

    assert summarize.main([exp, "--radii", "0.1,0.3", "--format", "csv"]) == 0
    printed = capsys.readouterr().out
    assert "r=0.1" in printed and "r=0.3" in printed and "PREDICT [%]" in printed
    attack = read_kind(storage.filesystem, root, "attack")
    by_trial = {t: set(attack.filter(pa.compute.equal(attack["trial"], t))["classifier"].to_pylist())
                for t in set(attack["trial"].to_pylist())}
    assert by_trial == {"t0": {"noisy(n=1,sigma=1,gaussian)"}}
    certified = read_kind(storage.filesystem, root, "certify").to_pylist()
    assert len(certified) == 4 and all(r["n"] == 100 and r["predict"] is None for r in certified)
    # several looks: an image decided early used fewer than n0 + n samples, in steps of one look (10)
    assert all((r["samples_used"] - 100) % 10 == 0 for r in certified)
    assert any(r["samples_used"] < 200 for r in certified)
