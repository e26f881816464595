"""The evaluation protocol: closed-form attack checks, EOT, stochastic models, cascade,
and the sanity flags with positive controls."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from helpers import NoisyInput, Quantized

from robust.attacks import create_attack
from robust.attacks.pgd import PGD
from robust.evaluation import checks
from robust.evaluation.protocol import CLEAN, LARGE_EPS_LABEL, evaluate_shard, is_stochastic
from robust.evaluation.suite import parse_attack, parse_attacks

CPU = torch.device("cpu")


class Linear2(nn.Module):
    """Binary linear classifier: logits (0, w.x + b)."""

    def __init__(self, d: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, generator=g))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)

    def distance(self, x):
        """Closed-form L2 distance to the decision boundary."""
        return (x.flatten(1) @ self.w + self.b).abs() / self.w.norm()


class Softmaxed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x), dim=1)


def _linear_points(model: Linear2, n: int = 64):
    """Points near 0.5 whose boundary distance is small enough that the box never binds."""
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.01 * torch.randn(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        model.b.fill_(-(x.flatten(1) @ model.w).median().item())
        y = model(x).argmax(1)
    d = model.distance(x).detach()
    keep = (d > 1e-3) & (d < 0.3)  # a step of 1.01 d along w stays inside [0,1]
    return x[keep], y[keep], d[keep]


@pytest.mark.parametrize("factor,fooled", [(1.01, True), (0.99, False)])
def test_l2_pgd_meets_the_closed_form_minimal_distance(factor, fooled):
    model = Linear2()
    x, y, d = _linear_points(model)
    assert len(y) > 10
    for i in range(len(y)):
        eps = float(d[i]) * factor
        attack = PGD(eps=eps, norm="l2", steps=50, random_start=False)
        x_adv = attack(model, x[i:i + 1], y[i:i + 1])
        assert (x_adv - x[i:i + 1]).norm().item() <= eps * (1 + 1e-5) + 1e-6
        assert bool(model(x_adv).argmax(1) != y[i]) == fooled, (i, factor)


def test_fgsm_is_the_analytic_sign_step():
    model = Linear2()
    x, y, _ = _linear_points(model)
    eps = 0.02
    x_adv = create_attack("fgsm", eps=eps)(model, x, y)
    direction = torch.where(y == 0, 1.0, -1.0).view(-1, 1, 1, 1)  # d CE / dx = +-sigmoid * w
    expected = torch.clamp(x + eps * direction * torch.sign(model.w.detach()).view(1, 1, 8, 8), 0, 1)
    torch.testing.assert_close(x_adv, expected)


def _reference_pgd(model, x, y, eps, step, steps, start):
    """Plain PGD written out by hand, without the EOT machinery (same ball operations)."""
    from robust.attacks.base import LinfBall

    ball = LinfBall(eps)
    x_adv = start.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x_adv), y, reduction="sum")
        grad, = torch.autograd.grad(loss, x_adv)
        x_adv = ball.project(ball.step(x_adv.detach(), grad, step), x)
    return x_adv


def test_eot_with_one_sample_is_the_plain_attack_bit_for_bit(trained_digits_model, digits):
    x, y, _ = digits.test.batch(torch.arange(64))
    eps = 0.1
    ours = PGD(eps=eps, step_size=eps / 4, steps=10, random_start=False, eot_samples=1)(trained_digits_model, x, y)
    reference = _reference_pgd(trained_digits_model, x, y, eps, eps / 4, 10, x)
    assert torch.equal(ours, reference)


def test_full_eot_pgd_does_not_depend_on_chunking(trained_digits_model, digits):
    x, y, _ = digits.test.batch(torch.arange(32))
    runs = [PGD(eps=0.1, steps=5, eot_samples=3, eot_chunk=c, seed=4)(trained_digits_model, x, y)
            for c in (None, 1, 32, 96)]
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], rtol=0, atol=1e-6)


def test_eot_pgd_is_stronger_than_plain_pgd_on_a_stochastic_model(trained_digits_model, digits):
    noisy = NoisyInput(trained_digits_model, sigma=0.5).eval()
    x, y, _ = digits.test.batch(torch.arange(200))
    torch.manual_seed(0)
    assert is_stochastic(noisy, x)

    def vote_accuracy(x_adv):
        torch.manual_seed(123)
        with torch.no_grad():
            draws = torch.stack([noisy(x_adv).argmax(1) for _ in range(25)])
        return (torch.mode(draws, 0).values == y).float().mean().item()

    torch.manual_seed(1)
    plain = vote_accuracy(PGD(eps=0.1, steps=10, seed=0)(noisy, x, y))
    torch.manual_seed(1)
    eot = vote_accuracy(PGD(eps=0.1, steps=10, seed=0, eot_samples=20)(noisy, x, y))
    assert eot < plain, (eot, plain)


SUITE = ["fgsm", "pgd-5", "pgd-l2-5", "eot-pgd-3", "apgd-ce:steps=5", "apgd-dlr:steps=5"]


@pytest.mark.parametrize("name", SUITE)
def test_every_attack_stays_in_its_threat_model(trained_digits_model, digits, name):
    x, y, _ = digits.test.batch(torch.arange(48))
    for spec in parse_attack(name):
        eps = spec.eps(digits.eps)
        x_adv = spec.build(digits.eps, seed=0)(trained_digits_model, x, y)
        delta = (x_adv - x).flatten(1)
        size = delta.norm(dim=1).max() if spec.norm == "l2" else delta.abs().max()
        assert size.item() <= eps * (1 + 1e-5) + 1e-7
        assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1


def test_attack_names_expand_and_reject_bad_input():
    assert [s.label for s in parse_attack("apgd-rand")] == ["apgd-ce-rand", "apgd-dlr-rand"]
    assert all(s.params["eot_samples"] == 20 and s.params["steps"] == 100 for s in parse_attack("apgd-rand"))
    spec, = parse_attack("pgd-20:eot_samples=80,restarts=2")
    assert spec.params["eot_samples"] == 80 and spec.label == "pgd-20:eot_samples=80,restarts=2"
    with pytest.raises(ValueError, match="unknown attack 'pgd-x'; valid choices: fgsm"):
        parse_attack("pgd-x")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        parse_attack("pgd-0")
    with pytest.raises(ValueError, match="eps must be"):
        parse_attacks(["pgd-5:eps=-0.1"], 0.1)


def _evaluate(model, digits, attacks, n=64, **kw):
    specs = parse_attacks(attacks, digits.eps)
    return evaluate_shard(model.eval(), digits.test, range(n), specs, digits.eps, CPU, seed=0,
                          batch_size=32, **kw)


def test_cascade_attacks_only_survivors_and_agrees_with_independent(trained_digits_model, digits):
    attacks = ["fgsm", "pgd-10:random_start=False"]
    cascade = _evaluate(trained_digits_model, digits, attacks, protocol="cascade", check_examples=0)
    independent = _evaluate(trained_digits_model, digits, attacks, protocol="independent")
    pgd = "pgd-10:random_start=False"
    fgsm_robust = cascade["fgsm"]["robust"]
    assert cascade[pgd]["attacked"] == fgsm_robust  # only the examples FGSM left correct
    # with the check subset (the first 8 of each batch of 32), those are attacked whatever FGSM did
    checked = _evaluate(trained_digits_model, digits, attacks, protocol="cascade", check_examples=8)
    in_subset = [i % 32 < 8 for i in range(64)]
    assert checked[pgd]["attacked"] == [r or s for r, s in zip(fgsm_robust, in_subset)]
    assert checked[pgd]["robust"] == cascade[pgd]["robust"]  # the worst case does not move
    assert not all(cascade[pgd]["attacked"]) and all(independent[pgd]["attacked"])
    # the running worst case is the same whichever protocol (deterministic attacks)
    assert cascade[pgd]["robust"] == independent[pgd]["robust"]
    for rows in (cascade, independent):
        assert all(not r or c for r, c in zip(rows[pgd]["robust"], rows["fgsm"]["robust"]))


def test_stochastic_models_are_detected_and_voted(trained_digits_model, digits):
    det = _evaluate(trained_digits_model, digits, ["fgsm"], large_eps_examples=0)
    assert not any(det[CLEAN]["stochastic"]) and det[CLEAN]["vote_prediction"] == det[CLEAN]["prediction"]
    noisy = NoisyInput(trained_digits_model, sigma=0.3)
    rows = _evaluate(noisy, digits, ["pgd-3", "pgd-3:eot_samples=1"], votes=5, large_eps_examples=0)
    assert all(rows[CLEAN]["stochastic"])
    assert set(rows["pgd-3"]["eot_samples"]) == {20}            # EOT by default on a stochastic model
    assert set(rows["pgd-3:eot_samples=1"]["eot_samples"]) == {1}
    flag = checks.non_eot_on_stochastic(["pgd-3:eot_samples=1"])
    assert flag.tripped and not checks.non_eot_on_stochastic([]).tripped


def _fractions(rows):
    clean = rows[CLEAN]
    n = len(clean["example"])
    large = rows[LARGE_EPS_LABEL]["correct"]
    return (sum(clean["zero_grad"]), n), sum(clean["prob_like"]) / n, 1 - sum(large) / len(large)


def test_masked_gradients_trip_the_flags_and_a_clean_model_does_not(trained_digits_model, digits):
    zero, prob, large = _fractions(_evaluate(trained_digits_model, digits, ["fgsm"]))
    assert not checks.zero_gradients(*zero).tripped and not checks.large_eps_success(large).tripped
    assert not checks.probabilities_as_logits(prob).tripped
    zero, _, large = _fractions(_evaluate(Quantized(trained_digits_model), digits, ["fgsm"]))
    assert checks.zero_gradients(*zero).tripped and zero[0] == zero[1]
    assert checks.large_eps_success(large).tripped


def test_softmax_outputs_trip_the_probability_flag(trained_digits_model, digits):
    _, prob, _ = _fractions(_evaluate(Softmaxed(trained_digits_model), digits, ["fgsm"]))
    assert checks.probabilities_as_logits(prob).tripped


def test_strength_ordering_flags():
    P = checks.Paired
    assert checks.iterative_weaker_than_single_step({("fgsm", "pgd-20"): P(0.5, 0.6, 100)}).tripped
    assert not checks.iterative_weaker_than_single_step({("fgsm", "pgd-20"): P(0.5, 0.4, 100),
                                                         ("fgsm", "apgd-ce"): P(0.5, 0.3, 100)}).tripped
    assert not checks.iterative_weaker_than_single_step({("fgsm", "pgd-20"): P(0.5, 0.55, 100, 0.08)}).tripped
    assert checks.more_iterations_weaker({(7, 20): P(0.40, 0.45, 100)}).tripped
    assert not checks.more_iterations_weaker({(7, 20): P(0.45, 0.40, 100), (20, 100): P(0.40, 0.40, 100)}).tripped
    flags = {f.name: f.tripped for f in checks.trial_flags(
        (0, 100), 0.0, 1.0, [],
        single_step={("fgsm", "pgd-7"): P(0.5, 0.4, 100), ("fgsm", "pgd-20"): P(0.5, 0.42, 100)},
        by_steps={(7, 20): P(0.40, 0.42, 100)})}
    assert flags == {"zero-gradients": False, "outputs-look-like-probabilities": False,
                     "non-eot-attack-on-stochastic-model": False, "large-eps-not-broken": False,
                     "iterative-weaker-than-fgsm": False, "more-iterations-weaker": True}


def test_confidence_intervals_and_mcnemar():
    from robust.evaluation.stats import clopper_pearson, mcnemar

    lo, hi = clopper_pearson(50, 100)
    assert lo == pytest.approx(0.3983, abs=1e-4) and hi == pytest.approx(0.6017, abs=1e-4)
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0
    b, c, p = mcnemar([True] * 10 + [False] * 10, [False] * 10 + [False] * 10)
    assert (b, c) == (10, 0) and p == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar([True, False], [True, False])[2] == 1.0


def test_smoothed_pgd_attacks_the_noisy_classifier_through_the_registry(trained_digits_model, digits):
    x, y, _ = digits.test.batch(torch.arange(64))
    spec, = parse_attack("smoothed-pgd-5:sigma=0.25,eot_samples=8")
    x_adv = spec.build(digits.eps, seed=0)(trained_digits_model, x, y)
    assert (x_adv - x).abs().max().item() <= digits.eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    torch.manual_seed(0)
    noisy = NoisyInput(trained_digits_model, sigma=0.25)
    with torch.no_grad():
        clean_acc = (noisy(x).argmax(1) == y).float().mean()
        adv_acc = (noisy(x_adv).argmax(1) == y).float().mean()
    assert adv_acc < clean_acc
    with pytest.raises(ValueError, match="sigma"):
        parse_attacks(["smoothed-pgd-5"], digits.eps)  # the attacker must be told sigma
