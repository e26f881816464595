"""AutoAttack's standard set (APGD-T, FAB-T, Square), minimal-norm attacks (C&W L2, DeepFool,
growing FGSM, FAB-T-min), the minimal-norm flag and summary, and the suite names."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from torch import nn
from helpers import Quantized, fgsm_band_eps

from cluster.evaluation import flag_inputs
from robust.attacks import create_attack
from robust.attacks.fab import project_onto_hyperplane_in_box
from robust.evaluation import checks
from robust.evaluation.protocol import attack_for_model, evaluate_shard
from robust.evaluation.suite import AttackSpec, is_minimal_norm, parse_attack, parse_attacks
from robust.results import minimal_norm, summary

CPU = torch.device("cpu")


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny forward passes (conftest)


@pytest.fixture(scope="module")
def batch(trained_digits_model, digits):
    """64 test digits the trained model classifies correctly."""
    x, y, _ = digits.test.batch(torch.arange(96))
    with torch.no_grad():
        right = trained_digits_model(x).argmax(1) == y
    return x[right][:64], y[right][:64]


@pytest.fixture(scope="module")
def eps_in_band(trained_digits_model, batch):
    """The smallest eps on a grid at which FGSM accuracy falls in [20%, 80%]."""
    eps = fgsm_band_eps(trained_digits_model, *batch)
    if eps is None:
        pytest.fail("no eps on the grid puts FGSM accuracy between 20% and 80%")
    return eps


class LinearK(nn.Module):
    """Affine K-class classifier on flattened 8x8 inputs: logits W x + b."""

    def __init__(self, k: int = 10, d: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(k, d, generator=g))
        # balanced at the grey image: every class is near, so boundaries are close to x = 0.5
        self.bias = nn.Parameter(-0.5 * self.weight.detach().sum(1) + 0.1 * torch.randn(k, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.weight.t() + self.bias

    def nearest_boundary(self, x, y):
        """Closed form: min_k (f_y - f_k) / ||w_y - w_k||_2 and its argmin (the minimal L2 distance)."""
        with torch.no_grad():
            f = self(x)
            gap = f.gather(1, y[:, None]) - f                                  # (N, K)
            w = (self.weight[y][:, None, :] - self.weight[None]).norm(dim=2)  # (N, K)
            dist = (gap / w.clamp_min(1e-12)).scatter(1, y[:, None], float("inf"))
            return dist.min(1)


class NoBackward(nn.Module):
    """A model whose backward pass raises: only its outputs can be used."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("gradients requested from a black-box model")
        return self.model(x)


def test_deepfool_finds_the_closed_form_minimal_perturbation_of_a_linear_classifier():
    model = LinearK()
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.02 * torch.randn(64, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    d_min, k_min = model.nearest_boundary(x, y)
    keep = d_min < 0.15  # a step of 1.02 d_min stays inside [0, 1]
    x, y, d_min, k_min = x[keep], y[keep], d_min[keep], k_min[keep]
    assert len(y) >= 10
    x_adv = create_attack("deepfool")(model, x, y)
    dist = (x_adv - x).flatten(1).norm(dim=1)
    assert bool((x_adv > 0).all() and (x_adv < 1).all())  # the box never bound
    # one linearisation is exact: 1.02 times the distance to the nearest boundary (+ 1e-4 logits)
    crossing = 1e-4 / (model.weight[y] - model.weight[k_min]).norm(dim=1)
    torch.testing.assert_close(dist, 1.02 * (d_min + crossing), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1), k_min)


def test_cw_median_l2_is_at_most_105_percent_of_deepfool(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:32], y[:32]

    def median_distance(x_adv):
        fooled = model(x_adv).argmax(1) != y
        d = (x_adv - x).flatten(1).norm(dim=1)
        return torch.where(fooled, d, torch.full_like(d, math.inf)).median().item()

    deepfool = median_distance(create_attack("deepfool")(model, x, y))
    # fewer iterations than Learn2Perturb's 1000 at 5e-4, with a larger step and a closer start for c
    cw = median_distance(create_attack("cw-l2", steps=100, lr=0.05, initial_const=0.1, search_steps=6)(model, x, y))
    assert math.isfinite(deepfool) and cw <= 1.05 * deepfool, (cw, deepfool)


def test_cw_confidence_kappa_is_reached_and_costs_distance(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:8], y[:8]
    kwargs = dict(steps=60, lr=0.05, initial_const=0.1, search_steps=4)
    x0 = create_attack("cw-l2", kappa=0.0, **kwargs)(model, x, y)
    x5 = create_attack("cw-l2", kappa=5.0, **kwargs)(model, x, y)
    with torch.no_grad():
        logits = model(x5)
    margin = logits.scatter(1, y[:, None], -math.inf).max(1).values - logits.gather(1, y[:, None]).squeeze(1)
    found = (x5 != x).flatten(1).any(1) & (x0 != x).flatten(1).any(1)
    assert found.float().mean() >= 0.75 and bool((margin[found] >= 5.0 - 1e-3).all())
    size = lambda x_adv: (x_adv - x).flatten(1).norm(dim=1)[found]  # noqa: E731
    assert bool((size(x5) > size(x0)).all())


def test_apgd_t_and_fab_t_are_at_least_as_strong_as_apgd_ce(trained_digits_model, batch, eps_in_band):
    model, (x, y), eps = trained_digits_model, batch, eps_in_band
    ce = _accuracy(model, create_attack("apgd-ce", eps=eps, steps=20)(model, x, y), y)
    apgd_t = _accuracy(model, create_attack("apgd-t", eps=eps, steps=20)(model, x, y), y)
    fab_t = _accuracy(model, create_attack("fab-t", eps=eps, steps=20)(model, x, y), y)
    assert apgd_t <= ce and fab_t <= ce, (apgd_t, fab_t, ce)
    assert ce < 1.0


def test_square_breaks_an_undefended_model_from_its_outputs_only(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    black_box = NoBackward(model)
    x_adv = create_attack("square", eps=0.2, queries=300, seed=0)(black_box, x, y)
    assert _accuracy(model, x_adv, y) < 0.5
    assert (x_adv - x).abs().max().item() <= 0.2 + 1e-6


@pytest.mark.parametrize("name,kwargs", [
    ("apgd-t", {"eps": 0.1, "steps": 5, "targets": 3}),
    ("apgd-t", {"eps": 1.0, "norm": "l2", "steps": 5, "targets": 3}),
    ("fab-t", {"eps": 0.1, "steps": 5, "targets": 3}),
    ("fab-t", {"eps": 1.0, "norm": "l2", "steps": 5, "targets": 3}),
    ("square", {"eps": 0.1, "queries": 50}),
])
def test_bounded_attacks_stay_in_their_ball_and_the_unit_box(trained_digits_model, batch, name, kwargs):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:24], y[:24]
    x_adv = create_attack(name, **kwargs)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    delta = (x_adv - x).flatten(1)
    size = delta.norm(dim=1) if kwargs.get("norm") == "l2" else delta.abs().amax(1)
    assert size.max().item() <= kwargs["eps"] * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("name,kwargs", [
    ("deepfool", {}),
    ("fgsm-grow", {}),
    ("fab-t", {"minimal": True, "steps": 10, "targets": 3}),
    ("fab-t", {"minimal": True, "norm": "l2", "steps": 10, "targets": 3}),
    ("cw-l2", {"steps": 30, "lr": 0.05, "initial_const": 0.1, "search_steps": 3}),
])
def test_minimal_norm_attacks_return_box_points_that_fool_or_the_input(trained_digits_model, batch, name, kwargs):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:24], y[:24]
    x_adv = create_attack(name, **kwargs)(model, x, y)
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    moved = (x_adv != x).flatten(1).any(1)
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    assert bool((fooled == moved).all())      # a moved point fools; a failure returns x itself
    assert fooled.float().mean().item() >= 0.9


def test_fgsm_grow_reports_the_first_eps_of_its_grid(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:16], y[:16]
    x_adv = create_attack("fgsm-grow", steps=100)(model, x, y)
    eps = (x_adv - x).flatten(1).abs().amax(1)
    for i in range(len(y)):
        assert abs(eps[i].item() * 100 - round(eps[i].item() * 100)) < 1e-3  # a grid value
        if eps[i].item() > 0.015:  # the grid point below did not fool the model
            smaller = create_attack("fgsm", eps=eps[i].item() - 0.01)(model, x[i:i + 1], y[i:i + 1])
            assert _accuracy(model, smaller, y[i:i + 1]) == 1.0
        assert _accuracy(model, x_adv[i:i + 1], y[i:i + 1]) == 0.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_matches_the_closed_form_and_respects_the_box(norm):
    g = torch.Generator().manual_seed(0)
    point = 0.5 + 0.01 * torch.randn(16, 1, 4, 4, generator=g)
    w = torch.randn(16, 1, 4, 4, generator=g)
    r = 0.01 * torch.randn(16, generator=g)
    delta = project_onto_hyperplane_in_box(point, w, r, norm)
    flat = w.flatten(1)
    closed = (r / flat.abs().sum(1))[:, None] * flat.sign() if norm == "linf" else \
        (r / flat.pow(2).sum(1))[:, None] * flat   # the box does not bind for small r
    torch.testing.assert_close(delta.flatten(1), closed, rtol=1e-4, atol=1e-7)
    # large r: the box binds; the constraint still holds where reachable and delta stays in the box
    r = 3 * torch.randn(16, generator=g)
    delta = project_onto_hyperplane_in_box(point, w, r, norm)
    assert bool(((point + delta) >= -1e-7).all() and ((point + delta) <= 1 + 1e-7).all())
    reachable = (flat.abs() * torch.maximum(point.flatten(1), 1 - point.flatten(1))).sum(1) > r.abs()
    torch.testing.assert_close((delta.flatten(1) * flat).sum(1)[reachable], r[reachable], rtol=1e-4, atol=1e-5)


def test_deepfool_eot_on_a_deterministic_model_is_the_plain_attack(trained_digits_model, batch):
    model, (x, y) = trained_digits_model, batch
    x, y = x[:16], y[:16]
    plain = create_attack("deepfool")(model, x, y)
    eot = create_attack("deepfool", eot_samples=3, eot_chunk=16)(model, x, y)
    torch.testing.assert_close(plain, eot, rtol=0, atol=1e-5)


def test_suite_names_the_autoattack_preset_in_order_and_marks_attack_kinds():
    specs = parse_attack("autoattack")
    assert [s.label for s in specs] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert [s.gradient_based for s in specs] == [True, True, True, False]
    assert specs[3].params["queries"] == 5000 and specs[1].params["steps"] == 100
    cw, = parse_attack("cw-l2:kappa=5")
    assert cw.label == "cw-l2:kappa=5" and cw.params["kappa"] == 5 and cw.norm == "l2"
    assert cw.minimal_norm and math.isinf(cw.eps(0.1)) and is_minimal_norm("cw-l2:kappa=5")
    assert [s.norm for s in parse_attack("fab-t-min-l2")] == ["l2"] and is_minimal_norm("fab-t-min")
    assert not is_minimal_norm("fab-t") and not is_minimal_norm("apgd-ce-rand")
    # the protocol gives EOT to gradient attacks on stochastic models, not to black-box ones
    assert "eot_samples" not in attack_for_model(specs[3], stochastic=True).params
    assert attack_for_model(parse_attack("deepfool")[0], stochastic=True).params["eot_samples"] == 20


@pytest.mark.parametrize("names,match", [
    (["cw-l3"], "unknown attack 'cw-l3'; valid choices: .*cw-l2"),
    (["cw-l2:kappa=-1"], "kappa must be >= 0"),
    (["cw-l2:colour=1"], "attack cw-l2:colour=1: .*unexpected keyword"),
    (["deepfool:eps=0.1"], "minimal-norm .* takes no eps"),
    (["fab-t:norm='l1'"], "valid choices: linf, l2"),
    (["apgd-t:targets=0"], "targets must be >= 1"),
    (["square:queries=0"], "queries must be an integer >= 1"),
    (["autoattack", "apgd-ce"], "repeats an attack"),
])
def test_bad_names_and_parameters_give_clear_errors(names, match):
    with pytest.raises(ValueError, match=match):
        parse_attacks(names, 0.1)


def _rows_table(out):
    """evaluate_shard's columns as one table of rows with their attack label."""
    return pa.concat_tables([pa.table({**cols, "attack": [label] * len(cols["example"])})
                             for label, cols in out.items()])


def _evaluate(model, digits, names, n=32, **kw):
    specs = parse_attacks(names, digits.eps)
    return evaluate_shard(model.eval(), digits.test, range(n), specs, digits.eps, CPU, seed=0,
                          batch_size=32, large_eps_examples=0, **kw)


def test_minimal_norm_rows_stay_out_of_the_worst_case_and_flag_masked_gradients(trained_digits_model, digits):
    # pgd-10 (10 steps of eps/4): pgd-3 cannot leave 3/4 of the ball and is rightly flagged as
    # weaker than FGSM on the check subset
    rows = _evaluate(trained_digits_model, digits, ["fgsm", "deepfool", "pgd-10"], protocol="cascade")
    deepfool, clean = rows["deepfool"], rows["clean"]
    assert deepfool["attacked"] == clean["correct"] and all(math.isinf(e) for e in deepfool["eps"])
    # DeepFool did not end the cascade: pgd-10 ran on FGSM's survivors and the check subset
    assert rows["pgd-10"]["attacked"] == [r or c for r, c in zip(rows["fgsm"]["robust"], clean["check"])]
    assert all(math.isfinite(d) for d, a in zip(deepfool["distance"], deepfool["attacked"]) if a)
    flags = {f.name: f for f in checks.trial_flags(**flag_inputs(_rows_table(rows)))}
    assert not flags["minimal-norm-attack-incomplete"].tripped
    assert not flags["iterative-weaker-than-fgsm"].tripped
    masked = _evaluate(Quantized(trained_digits_model), digits, ["deepfool"])
    assert any(math.isinf(d) for d in masked["deepfool"]["distance"])  # no adversarial point: inf
    flags = {f.name: f for f in checks.trial_flags(**flag_inputs(_rows_table(masked)))}
    assert flags["minimal-norm-attack-incomplete"].tripped


def test_minimal_norm_flag_is_a_pure_threshold():
    assert checks.minimal_norm_incomplete({"deepfool": 0.97, "cw-l2": 1.0}).tripped
    assert not checks.minimal_norm_incomplete({"deepfool": 1.0, "cw-l2:kappa=5": 1.0}).tripped
    assert checks.minimal_norm_incomplete({"deepfool": 0.97}).value == pytest.approx(0.03)


def test_summary_reports_median_distance_and_success_at_budgets():
    points = [{"trial": "t", "attack": "deepfool", "norm": "l2", "distances": [0.2, 0.4, 0.6, math.inf]},
              {"trial": "t", "attack": "fgsm-grow", "norm": "linf", "distances": [0.1]}]
    header, rows = minimal_norm.minimal_norm_rows(points, {"t": "model"}, "l2", (0.3, 0.5, 1.0))
    assert header[-3:] == ["<= 0.3 [%]", "<= 0.5 [%]", "<= 1 [%]"]
    assert rows == [["model", "deepfool", "4", "75.00", "0.5", "25.00", "50.00", "75.00"]]
    assert minimal_norm.parse_budgets(["l2=1,2"])["l2"] == (1.0, 2.0)
    # minimal-norm rows (misclassified by design) stay out of the accuracy tables and the worst case
    attacks = pa.table({"trial": ["t"] * 6, "attack": ["clean", "clean", "fgsm", "fgsm", "deepfool", "deepfool"],
                        "example": [0, 1, 0, 1, 0, 1], "correct": [True, True, True, False, False, False],
                        "vote_correct": [True, True, True, False, False, False], "stochastic": [False] * 6})
    result = summary.trial_results(attacks, [], pa.table({"trial": [], "flag": [], "tripped": []}))["t"]
    assert set(result.outcomes) == {"clean", "fgsm", summary.WORST}
    assert result.accuracy(summary.WORST) == 0.5
    with pytest.raises(ValueError, match="unknown norm 'l3'"):
        minimal_norm.parse_budgets(["l3=1"])


def test_autoattack_cascade_runs_the_four_in_order_on_the_survivors(trained_digits_model, digits):
    specs = [AttackSpec("apgd-ce", "apgd-ce", {"steps": 5}), AttackSpec("apgd-t", "apgd-t", {"steps": 5, "targets": 2}),
             AttackSpec("fab-t", "fab-t", {"steps": 5, "targets": 2}), AttackSpec("square", "square", {"queries": 30})]
    rows = evaluate_shard(trained_digits_model.eval(), digits.test, range(32), specs, 0.15, CPU, seed=0,
                          batch_size=32, protocol="cascade", large_eps_examples=0, check_examples=0)
    assert list(rows)[1:] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for before, after in zip(["apgd-ce", "apgd-t", "fab-t"], ["apgd-t", "fab-t", "square"]):
        assert rows[after]["attacked"] == rows[before]["robust"]
