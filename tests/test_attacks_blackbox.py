"""Black-box attacks (few-pixel, LocalSearch, Boundary), transfer attacks, and the
black-box-stronger-than-white-box flag."""
from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from torch import nn
from helpers import Quantized

from cluster.evaluation import EvalSettings, ModelSource, flag_inputs
from cluster.records import STATE_FILE
from cluster.storage import Storage
from cluster.transfer import check_datasets, from_source, run_transfer, seed_matrix
from robust.attacks import create_attack
from robust.attacks.few_pixel import FewPixel
from robust.data.base import ImageSplit
from robust.evaluation import checks
from robust.evaluation.protocol import attack_for_model, evaluate_shard, perturbation_norm
from robust.evaluation.suite import parse_attack, parse_attacks
from robust.evaluation.transfer import classify_on_target, craft_batches
from robust.results.schema import read_kind
from robust.results.tables import transfer_rows
from robust.spec import TrialSpec

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # thousands of tiny forward passes (conftest)


@pytest.fixture(scope="module")
def batch(digits):
    x, y, _ = digits.test.batch(torch.arange(48))
    return x, y


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


class _RaisingGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this model refuses gradients")


class NoGradients(nn.Module):
    """A model whose backward raises: only its outputs can be queried."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_RaisingGrad.apply(x))


# --- the attacks --------------------------------------------------------------------------------

def test_few_pixel_defaults_are_learn2perturb_a5():
    attack = FewPixel()
    assert (attack.population, attack.iterations, attack.scale) == (400, 75, 0.5)


@pytest.mark.parametrize("pixels", [1, 3])
def test_few_pixel_changes_at_most_the_requested_pixels(trained_digits_model, batch, pixels):
    model, (x, y) = trained_digits_model, batch
    x_adv = create_attack("few-pixel", eps=pixels, population=40, iterations=8, seed=1,
                          query_chunk=4096)(model, x, y)
    changed = perturbation_norm(x_adv - x, "l0")
    assert changed.max().item() <= pixels
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    if pixels == 3:  # three pixels of an 8x8 digit fool an undefended model on some examples
        assert changed.max().item() == pixels
        assert _accuracy(model, x_adv, y) < _accuracy(model, x, y) - 0.1


def test_query_attacks_work_on_a_model_whose_gradient_raises(trained_digits_model, batch):
    model = NoGradients(trained_digits_model)
    x, y = batch[0][:8], batch[1][:8]
    with pytest.raises(RuntimeError, match="refuses gradients"):
        create_attack("pgd", eps=0.1, steps=1)(model, x, y)  # the model really refuses gradients
    attacks = [create_attack("few-pixel", eps=2, population=20, iterations=3, seed=0),
               create_attack("local-search", eps=math.inf, rounds=3, seed=0),
               create_attack("local-search", eps=0.1, norm="linf", rounds=3, seed=0),
               create_attack("boundary", eps=math.inf, steps=20, seed=0)]
    for attack in attacks:
        x_adv = attack(model, x, y)
        assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1, type(attack).__name__


def test_local_search_lowers_accuracy_and_linf_variant_stays_in_ball(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:32], y[:32]
    clean = _accuracy(model, x, y)
    x_adv = create_attack("local-search", eps=math.inf, rounds=40, seed=0, query_chunk=4096)(model, x, y)
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert _accuracy(model, x_adv, y) <= clean - 2 / 32
    x_ball = create_attack("local-search", eps=0.1, norm="linf", rounds=5, seed=0, query_chunk=4096)(model, x, y)
    assert (x_ball - x).abs().max().item() <= 0.1 + 1e-6
    assert (x_ball != x).any()


def test_boundary_bounded_and_minimal_norm(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:32], y[:32]
    minimal = create_attack("boundary", eps=math.inf, steps=150, seed=0, query_chunk=4096)(model, x, y)
    fooled = model(minimal).argmax(1) != y
    assert fooled.float().mean().item() >= 0.95  # an unbounded decision-based attack (nearly) always succeeds
    bounded = create_attack("boundary", eps=1.5, steps=150, seed=0, query_chunk=4096)(model, x, y)
    dist = (bounded - x).flatten(1).norm(dim=1)
    assert dist.max().item() <= 1.5 + 1e-5  # outside the budget the attack returns the clean image
    assert _accuracy(model, bounded, y) < _accuracy(model, x, y) - 0.3
    assert bounded.min().item() >= 0.0 and bounded.max().item() <= 1.0


# --- the suite ----------------------------------------------------------------------------------

def test_suite_names_and_clear_errors():
    specs = {s.label: s for s in parse_attacks(["few-pixel-2", "localsearch", "boundary", "pgd-5"], 0.1)}
    assert specs["few-pixel-2"].norm == "l0" and specs["few-pixel-2"].eps(0.1) == 2
    assert math.isinf(specs["localsearch"].eps(0.1)) and specs["boundary"].eps(0.1) == 0.5
    assert [s.gradient_based for s in specs.values()] == [False, False, False, True]
    minimal, = parse_attack("boundary-min")  # unbounded: a minimal-norm attack (eps = inf)
    assert minimal.minimal_norm and not specs["boundary"].minimal_norm and math.isinf(minimal.build(0.1, 0).eps)
    # black-box attacks get no EOT on a stochastic model; gradient attacks do
    assert "eot_samples" not in attack_for_model(specs["boundary"], stochastic=True).params
    assert "eot_samples" in attack_for_model(specs["pgd-5"], stochastic=True).params
    bad = {"few-pixel-0": "pixels) must be >= 1", "localsearch:eps=0.1": "eps must be inf",
           "boundary:norm=linf": "norm is 'l2'", "few-pixel-1:norm=linf": "norm is 'l0'",
           "few-pixel-1:max_examples=0": "max_examples must be an integer >= 1",
           "localsearch:r=3": "r must be in [0, 2]", "boundary:nonsense=1": "unexpected keyword",
           "few-pixel-1:population=2": "population must be an integer >= 4"}
    for name, message in bad.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            parse_attacks([name], 0.1)


def test_an_attack_cap_limits_its_rows_to_the_first_examples(trained_digits_model, digits):
    specs = parse_attacks(["fgsm", "few-pixel-1:max_examples=5,population=8,iterations=1"], digits.eps)
    out = evaluate_shard(trained_digits_model, digits.test, range(12), specs, digits.eps, CPU, seed=0,
                         batch_size=4, large_eps_examples=0)
    capped = out[specs[1].label]
    assert capped["example"] == digits.test.indices[:5].tolist()
    assert len(out["fgsm"]["example"]) == 12


# --- the flag -----------------------------------------------------------------------------------

def test_black_box_flag_pure_function():
    assert checks.white_box_covers(("l2", 0.5), ("l2", 1.0)) and not checks.white_box_covers(("l2", 0.5), ("linf", 1.0))
    assert not checks.white_box_covers(("l2", 1.0), ("l2", 0.5))
    assert checks.black_box_stronger_than_white_box({"boundary": (0.2, "pgd-l2-10", 0.6)}).tripped
    assert not checks.black_box_stronger_than_white_box({"boundary": (0.6, "pgd-l2-10", 0.2)}).tripped
    assert not checks.black_box_stronger_than_white_box({"boundary": (0.595, "pgd-l2-10", 0.6)}).tripped


def _flags(model, digits, names):
    specs = parse_attacks(names, digits.eps)
    cols = evaluate_shard(model, digits.test, range(32), specs, digits.eps, CPU, seed=0, batch_size=32,
                          large_eps_examples=0)
    rows = pa.concat_tables([pa.table({**c, "attack": [label] * len(c["example"])}) for label, c in cols.items()],
                            promote_options="default")  # queries: counted (black-box) or null
    inputs = flag_inputs(rows)
    return {f.name: f for f in checks.trial_flags(**inputs)}, inputs


@pytest.mark.timeout(240)
def test_boundary_beating_pgd_flags_a_gradient_masked_model(trained_digits_model, digits):
    names = ["fgsm", "pgd-l2-10", "boundary:steps=300"]  # both at the default L2 budget 0.5
    masked, inputs = _flags(Quantized(trained_digits_model, levels=8), digits, names)
    bb, white, wb = inputs["black_box"]["boundary:steps=300"]
    assert white == "pgd-l2-10" and bb < wb
    assert masked["black-box-stronger-than-white-box"].tripped
    # clean control: the same network with honest gradients
    honest, _ = _flags(trained_digits_model, digits, names)
    assert not honest["black-box-stronger-than-white-box"].tripped
    # a black-box attack weaker than FGSM is no reason for the FGSM flag
    assert not any("boundary:steps=300" in pair for pair in inputs["single_step"])


# --- transfer -----------------------------------------------------------------------------------

class PixelReader(nn.Module):
    """Reads pixels 0..K-1 of a grey image: logit c = 100 (x_c - 0.5), the last class a constant 1.

    Every model computes the same outputs, but model k lets the gradient through pixel k only,
    so PGD crafted on model k brightens pixel k alone and every model then predicts class k:
    a target's prediction names the source its examples were crafted on.
    """

    def __init__(self, k: int, classes: int) -> None:
        super().__init__()
        self.k, self.classes = k, classes

    def forward(self, x):
        vals = x.flatten(1)[:, :self.classes - 1]
        own = torch.zeros_like(vals, dtype=torch.bool)
        own[:, self.k] = True
        vals = torch.where(own, vals, vals.detach())
        return torch.cat([100 * (vals - 0.5), torch.ones_like(vals[:, :1])], dim=1)


def test_transfer_matrix_has_an_empty_diagonal_and_each_cell_uses_its_source():
    k = 3
    split = ImageSplit(torch.full((10, 1, 4, 4), 0.5), torch.full((10,), k), torch.arange(10))
    models = {f"t{i}": PixelReader(i, k + 1) for i in range(k)}
    sources = [ModelSource(f"t{i}", TrialSpec(defense="standard", dataset="digits", model="small-cnn",
                                              seed=i).to_dict()) for i in range(k)]
    plan = seed_matrix(sources)
    assert plan == {s: [t for t in models if t != s] for s in models}  # the diagonal is empty
    attacks = parse_attacks(["pgd-4:random_start=False"], eps_data=0.1)
    for source, targets in plan.items():
        batches = craft_batches(models[source], split, range(10), attacks, 0.1, CPU, seed=0, batch_size=4)
        for target in targets:
            cols = classify_on_target(models[target], batches, seed=1)[attacks[0].label]
            assert cols["prediction"] == [int(source[1:])] * 10, (source, target)
            assert cols["source_prediction"] == [int(source[1:])] * 10
            assert all(abs(d - 0.1) < 1e-6 for d in cols["distance"])
    assert from_source(sources[0], sources) == {"t0": ["t1", "t2"]}
    other = ModelSource("t9", TrialSpec(defense="standard", dataset="synthetic", model="small-cnn").to_dict())
    with pytest.raises(ValueError, match="different datasets"):
        check_datasets({"t0": ["t9"]}, {"t0": sources[0], "t9": other})
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_matrix(sources[:1])


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_sharded_transfer_matches_one_pass_and_fills_the_matrix(ray_local, tmp_path, digits, trained_digits_model):
    storage = Storage(str(tmp_path))
    root = storage.experiment("exp")
    sources = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = {k: v + 0.01 * seed * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in trained_digits_model.state_dict().items()}
        ckpt = tmp_path / f"ckpt{seed}"
        ckpt.mkdir()
        torch.save({"model": state}, ckpt / STATE_FILE)
        spec = TrialSpec(defense="standard", dataset="digits", model="small-cnn", seed=seed)
        sources.append(ModelSource(f"t{seed}", spec.to_dict(), checkpoint=str(ckpt)))
    settings = EvalSettings(attacks=("fgsm",), batch_size=16, shard_size=16, max_examples=32)
    assert run_transfer(seed_matrix(sources), sources, settings, storage, root, actors=2) == 64
    table = read_kind(storage.filesystem, root, "transfer")
    pairs = set(zip(table["source"].to_pylist(), table["trial"].to_pylist()))
    assert pairs == {("t0", "t1"), ("t1", "t0")}
    # the cell t0 -> t1 is exactly the one-process computation
    from cluster.evaluation import load_model
    from robust.spec import load_splits

    m0, m1 = (load_model(s, storage, load_splits(TrialSpec.from_dict(s.spec))) for s in sources)
    batches = craft_batches(m0.eval(), digits.test, range(32), parse_attacks(["fgsm"], digits.eps), digits.eps,
                            CPU, seed=0, batch_size=16)
    expected = classify_on_target(m1.eval(), batches, seed=1)["fgsm"]
    cell = table.filter(pc.and_(pc.equal(table["source"], "t0"), pc.equal(table["trial"], "t1"))).sort_by("example")
    assert cell["example"].to_pylist() == expected["example"]
    assert cell["prediction"].to_pylist() == expected["prediction"]
    assert run_transfer(seed_matrix(sources), sources, settings, storage, root, actors=2) == 0  # all written
    header, rows = transfer_rows(storage.filesystem, root, {})
    assert header[2:] == ["t0", "t1"] and rows[0][:3] == ["fgsm", "t0", "-"] and rows[1][3] == "-"


def test_evaluate_refuses_bad_transfer_options_with_exit_2(tmp_path, trained_digits_model):
    from launch_probe import probe

    from cluster.records import write_trial_row

    storage = Storage(str(tmp_path))
    root = storage.experiment("exp")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": trained_digits_model.state_dict()}, ckpt / STATE_FILE)
    write_trial_row(storage, root, "t0", TrialSpec(defense="standard", dataset="digits", model="small-cnn"),
                    "completed", checkpoint=str(ckpt))
    exp = str(tmp_path / "exp")
    cases = {
        "one seed": ([exp, "--transfer", "seeds"], "needs a configuration with at least 2 seeds"),
        "both": ([exp, "--transfer", "seeds", "--transfer-from", "t0"], "choose one of --transfer seeds"),
        "unknown source": ([exp, "--transfer-from", "t9"], "unknown source trial 't9'; completed trials: t0"),
        "no other target": ([exp, "--transfer-from", "t0"], "no target model besides the source t0"),
        "factory without weights": ([exp, "--transfer-from", "m:f"], "needs --source-weights FILE"),
        "weights alone": ([exp, "--source-weights", "w.pt"], "--source-weights goes with --transfer-from"),
    }
    results = probe("evaluate", {k: v[0] for k, v in cases.items()})
    for name, (_, message) in cases.items():
        r = results[name]
        lines = r["stderr"].strip().splitlines()
        assert r["code"] == 2 and not r["ray"], (name, r)
        assert len(lines) == 1 and message in lines[0], (name, lines)
