"""Black-box attacks on stochastic models decide with the verdict's rule and count their queries
(issue 14, section 2).

A toy randomized classifier makes every property cheap to measure: two classes, and the score
of class 1 is z_1 - z_0 = gain * (max pixel - 0.5) + offset + N(0, 1), a fresh normal draw per
input row.  The probability that a draw classifies an image correctly (class 0) is then
Phi(-(gain * (max - 0.5) + offset)): raising one pixel lowers it, so every attack family
(square windows, single pixels, local search, boundary walks) has something to find, and near
the boundary a single query is a coin flip.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import Quantized
from torch import nn

from robust.attacks import create_attack, verdict
from robust.attacks.queries import DEFAULT_QUERY_DRAWS, QueryAttack
from robust.evaluation import checks
from robust.evaluation.protocol import perturbation_norm
from robust.evaluation.suite import parse_attacks

#: Small budgets of every black-box attack (the suite's names: norm and budget of each).
ATTACKS = {
    "square": ("square", dict(eps=0.1, queries=100)),
    "few-pixel-1": ("few-pixel", dict(eps=1, population=10, iterations=5)),
    "localsearch": ("local-search", dict(eps=math.inf, rounds=5)),
    "localsearch-linf": ("local-search", dict(eps=0.1, norm="linf", rounds=5)),
    "boundary": ("boundary", dict(eps=1.0, steps=50, init_tries=5)),
    "boundary-min": ("boundary", dict(eps=math.inf, steps=50, init_tries=5)),
}


class NoisyMax(nn.Module):
    """z_1 - z_0 = gain (max pixel - 0.5) + offset + noise; noise N(0, 1) per row (``shared``:
    one draw per forward call, as a model that samples its weights once per batch)."""

    def __init__(self, gain: float = 20.0, offset: float = -2.0, noise: float = 1.0, shared: bool = False):
        super().__init__()
        self.gain, self.offset, self.noise, self.shared = gain, offset, noise, shared

    def forward(self, x):
        d = self.gain * (x.flatten(1).amax(1) - 0.5) + self.offset
        draw = torch.randn(1 if self.shared else len(x), device=x.device)
        d = d + self.noise * draw.expand(len(x))
        return torch.stack([torch.zeros_like(d), d], 1)


class RowCounter(nn.Module):
    """Counts the input rows of every forward pass of the wrapped model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += len(x)
        return self.model(x)


def images(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [0.45, 0.55]: the max near 0.55, so a draw is correct with probability
    Phi(2 - 1) = 0.84 on NoisyMax(); label 0."""
    g = torch.Generator().manual_seed(seed)
    return 0.45 + 0.1 * torch.rand((n, 1, 8, 8), generator=g), torch.zeros(n, dtype=torch.long)


def build(label: str, **overrides) -> QueryAttack:
    name, params = ATTACKS[label]
    return create_attack(name, seed=0, **{**params, **overrides})


def fresh_score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 200) -> torch.Tensor:
    """The verdict: fraction of ``draws`` fresh draws classifying x correctly, from a stream of
    its own (independent of the attack's draws)."""
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        return verdict.correct_fraction(verdict.draw_logits(model, x, draws, 4096), y)


pytestmark = pytest.mark.usefixtures("one_thread")  # thousands of tiny forward passes (conftest)


def test_a_single_noisy_query_declares_broken_what_every_draw_does_not():
    """At the clean input a draw is right half the time: one query calls about half the
    examples "already misclassified" (Square spends its one query and returns them untouched,
    though fresh draws classify them correctly half the time); k draws must all misclassify."""
    model = NoisyMax(offset=-1.0)  # max 0.55: a draw is correct with probability 1/2
    x, y = images()
    one = build("square", query_draws=1)
    x_one = one(model, x, y)
    untouched = one.queries == 1
    assert untouched.sum() >= 8 and torch.equal(x_one[untouched], x[untouched])
    assert fresh_score(model, x[untouched], y[untouched]).mean() > 0.3   # not broken by the verdict
    k = build("square", query_draws=DEFAULT_QUERY_DRAWS)
    k(model, x, y)
    assert (k.queries == DEFAULT_QUERY_DRAWS).sum() <= 1   # (1/2)^8 per example
    assert bool((k.queries[untouched] > DEFAULT_QUERY_DRAWS).all())


@pytest.mark.parametrize("label", list(ATTACKS))
def test_k_draws_return_points_that_fresh_draws_misclassify_more_often(label):
    """The verdict (200 fresh draws, a stream of its own) scores the points found with the
    default k clearly below those found from single noisy queries."""
    model = NoisyMax()
    x, y = images()
    clean = fresh_score(model, x, y)
    scores = {}
    for k in (1, DEFAULT_QUERY_DRAWS):
        torch.manual_seed(0)
        attack = build(label, query_draws=k)
        scores[k] = torch.minimum(clean, fresh_score(model, attack(model, x, y), y)).mean().item()
    assert scores[DEFAULT_QUERY_DRAWS] <= scores[1] - 0.08, scores


def _in_threat_model(label: str, x_adv: torch.Tensor, x: torch.Tensor) -> bool:
    _, params = ATTACKS[label]
    inside = bool(x_adv.min() >= 0 and x_adv.max() <= 1)
    if label.startswith("few-pixel"):
        return inside and perturbation_norm(x_adv - x, "l0").max().item() <= params["eps"]
    if label in ("square", "localsearch-linf"):
        return inside and (x_adv - x).abs().max().item() <= params["eps"] + 1e-6
    if label == "boundary":
        return inside and (x_adv - x).flatten(1).norm(dim=1).max().item() <= params["eps"] + 1e-5
    return inside  # localsearch and boundary-min are unbounded


@pytest.mark.parametrize("label", list(ATTACKS))
@pytest.mark.parametrize("kind", ["per-row noise", "batch-shared noise", "deterministic"])
def test_queries_count_every_input_row_and_points_stay_in_the_threat_model(label, kind):
    """``queries`` sums to the rows the model saw (besides the stochasticity probe on the
    batch), k rows per query on a stochastic model and one on a deterministic one,
    whether or not the model lets stacked copies draw independently."""
    noise = {"per-row noise": dict(), "batch-shared noise": dict(shared=True), "deterministic": dict(noise=0.0)}
    model = RowCounter(NoisyMax(**noise[kind]))
    x, y = images(12)
    verdict.stacking_gives_distinct_draws(model, x)  # the one-off probe of a model object, cached
    for k in (1, 3):
        model.rows = 0
        probe = verdict.is_stochastic(model, x)
        probe_rows, model.rows = model.rows, 0
        attack = build(label, query_draws=k)
        x_adv = attack(model, x, y)
        assert attack.stochastic == probe == (kind != "deterministic")
        assert attack.queries.dtype == torch.long and attack.queries.shape == (len(x),)
        assert int(attack.queries.sum()) + probe_rows == model.rows, (k, attack.queries)
        per_query = k if attack.stochastic else 1
        assert bool((attack.queries % per_query == 0).all()) and bool((attack.queries >= per_query).all())
        assert _in_threat_model(label, x_adv, x)


def test_queries_scale_with_k_where_the_path_does_not_depend_on_the_draws():
    """Examples that no draw can break run the whole budget: Square spends 1 + restarts x queries
    queries and differential evolution population x (1 + iterations), k rows each."""
    model = NoisyMax(offset=-100.0)
    x, y = images(6)
    for k in (1, 2, 5):
        square = build("square", query_draws=k, restarts=2)
        square(model, x, y)
        assert square.queries.tolist() == [k * (1 + 2 * 100)] * len(x)
        few = build("few-pixel-1", query_draws=k)
        few(model, x, y)
        assert few.queries.tolist() == [k * 10 * (1 + 5)] * len(x)


@pytest.mark.parametrize("label", list(ATTACKS))
def test_query_draws_change_nothing_on_a_deterministic_model(label):
    model = NoisyMax(noise=0.0)
    x, y = images(12)
    one, many = build(label, query_draws=1), build(label, query_draws=16)
    torch.manual_seed(0)
    a = one(model, x, y)
    after_one = torch.randn(4)
    torch.manual_seed(0)
    b = many(model, x, y)
    assert torch.equal(a, b) and torch.equal(one.queries, many.queries)
    assert torch.equal(after_one, torch.randn(4))  # the same use of the global random stream
    assert not many.stochastic


def test_query_draws_is_an_attack_override_and_eot_samples_names_it_on_square():
    for name in ("square", "few-pixel-1", "localsearch", "localsearch-linf", "boundary", "boundary-min"):
        spec, = parse_attacks([f"{name}:query_draws=16"], 0.1)
        assert spec.build(0.1, 0).query_draws == 16
        assert parse_attacks([name], 0.1)[0].build(0.1, 0).query_draws == DEFAULT_QUERY_DRAWS
    spec, = parse_attacks(["square:eot_samples=20"], 0.1)  # autoattack:eot_samples=20 reaches Square so
    assert spec.build(0.1, 0).query_draws == 20
    with pytest.raises(ValueError, match="query_draws must be an integer >= 1, got 0"):
        parse_attacks(["boundary:query_draws=0"], 0.1)
    with pytest.raises(ValueError, match="former name of query_draws"):
        create_attack("square", eps=0.1, query_draws=4, eot_samples=8)


@pytest.mark.parametrize("masked", [True, False])
def test_black_box_flag_fires_on_a_masked_stochastic_model_only(masked):
    """Square with k draws against EOT-PGD, both scored by the same fresh verdict draws: on a
    randomized model whose gradients are masked (inputs rounded: zero gradient) the black-box
    attack wins and the flag trips; with honest gradients EOT-PGD is at least as strong and the
    flag stays quiet.  PGD starts at x so that only its gradient can move it."""
    model = Quantized(NoisyMax(), levels=8) if masked else NoisyMax()
    x, y = images()
    clean = fresh_score(model, x, y)
    torch.manual_seed(0)
    pgd = create_attack("pgd", eps=0.1, steps=10, step_size=0.025, eot_samples=8, random_start=False,
                        seed=0)(model, x, y)
    torch.manual_seed(0)
    square = build("square")(model, x, y)
    white = torch.minimum(clean, fresh_score(model, pgd, y)).mean().item()
    black = torch.minimum(clean, fresh_score(model, square, y)).mean().item()
    flag = checks.black_box_stronger_than_white_box({"square": (black, "eot-pgd-10", white)})
    assert flag.tripped == masked, (black, white)
