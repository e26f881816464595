"""The verdict on stochastic models (issue 14, sections 1-3): EOT averages distinct draws for
every model, registered or external; attacks on stochastic models are never weaker with EOT
than without; the verdict's draws are a stream of their own."""
from __future__ import annotations

import pytest
import torch
from helpers import NoisyInput, small_model
from torch import nn

from robust.attacks import verdict
from robust.attacks.base import GradientAttack, cross_entropy
from robust.defenses import create_defense, defense_names
from robust.evaluation.protocol import CLEAN, evaluate_shard, judge
from robust.evaluation.suite import parse_attacks

CPU = torch.device("cpu")
#: Defenses whose deployed model must come out stochastic (the test is not vacuous).
KNOWN_STOCHASTIC = {"learn2perturb", "learn2perturb-r", "pni", "sdr", "dropconnect", "stn"}


class BatchSharedNoise(nn.Module):
    """An external randomized model that draws ONE weight perturbation per forward call."""

    def __init__(self, model: nn.Module, sigma: float = 0.5) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        shift = self.sigma * torch.randn(1, device=x.device)  # shared by the whole batch
        return self.model(x) * (1 + shift)


class Recorder(nn.Module):
    """Passes through, keeping every forward call's outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        out = self.model(x)
        self.calls.append(out.detach().clone())
        return out


def _stochastic_models(digits):
    """(name, eval-mode model) for every registered defense whose model is stochastic, and two
    external ones."""
    x, _, _ = digits.test.batch(torch.arange(4))
    out = []
    for name in defense_names():
        defense = create_defense(name, eps_data=digits.eps)
        model = defense.deployed(defense.prepare_model(small_model(digits))).eval()  # what is evaluated
        if verdict.is_stochastic(model, x):
            out.append((name, model))
    out.append(("external-batch-shared", BatchSharedNoise(small_model(digits)).eval()))
    out.append(("external-per-example", NoisyInput(small_model(digits), 0.3).eval()))
    return out


def test_every_known_randomized_defense_is_detected_as_stochastic(digits):
    names = {name for name, _ in _stochastic_models(digits)}
    assert KNOWN_STOCHASTIC <= names


def test_stacked_eot_copies_never_share_a_draw(digits):
    """With eot_chunk large enough to stack every copy, the S copies of one input within an
    EOT gradient are S distinct draws, for every stochastic model."""
    x, y, _ = digits.test.batch(torch.arange(2))
    s = 8
    for name, model in _stochastic_models(digits):
        recorder = Recorder(model)
        attack = GradientAttack(eot_samples=s, eot_chunk=10_000)
        attack.copies_per_pass(recorder, x)  # the probe (cached per model object)
        recorder.calls.clear()
        attack.input_gradient(recorder, x, y)
        rows = torch.cat([c.view(-1, 2, c.shape[-1])[:, 0] for c in recorder.calls])  # example 0's draws
        assert rows.shape[0] == s, name
        same = (rows[:, None] == rows[None]).all(-1)
        same.fill_diagonal_(False)
        assert not bool(same.any()), f"{name}: stacked EOT copies shared a draw"


def test_batch_shared_noise_falls_back_to_one_copy_per_pass(digits):
    x, _, _ = digits.test.batch(torch.arange(2))
    shared = BatchSharedNoise(small_model(digits)).eval()
    per_example = NoisyInput(small_model(digits), 0.3).eval()
    attack = GradientAttack(eot_samples=8, eot_chunk=10_000)
    assert attack.copies_per_pass(shared, x) == 1
    assert attack.copies_per_pass(per_example, x) == 8
    assert attack.copies_per_pass(small_model(digits).eval(), x) == 8  # deterministic: stacking is harmless


def test_eot_gradient_spread_shrinks_as_one_over_sqrt_s(digits):
    """The EOT gradient averages S independent draws: its spread over repeated calls at S = 4 is
    about twice the spread at S = 16 (1/sqrt(S)); one shared draw would leave it unchanged."""
    x, y, _ = digits.test.batch(torch.arange(2))
    torch.manual_seed(0)
    for name, model in _stochastic_models(digits):
        spreads = {}
        for s in (4, 16):
            attack = GradientAttack(eot_samples=s, eot_chunk=10_000)
            grads = torch.stack([attack.input_gradient(model, x, y) for _ in range(10)])
            spreads[s] = grads.std(0).mean().item()
        ratio = spreads[4] / spreads[16]
        assert 1.4 < ratio < 2.9, f"{name}: spread ratio {ratio:.2f} at S = 4 vs 16 (expected about 2)"


def test_the_verdict_draws_a_stream_of_its_own(digits):
    """judge() takes its R draws from its seed, leaves the attacks' stream where it was, and
    the same seed gives the same counts."""
    x, y, _ = digits.test.batch(torch.arange(16))
    model = NoisyInput(small_model(digits), sigma=0.5).eval()
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = judge(model, x, y, votes=10, stochastic=True, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = judge(model, x, y, votes=10, stochastic=True, seed=7)
    c = judge(model, x, y, votes=10, stochastic=True, seed=8)
    assert torch.equal(a.correct, b.correct) and a.draws == 10
    assert not torch.equal(torch.stack([a.single, a.vote]), torch.stack([c.single, c.vote])) or \
        not torch.equal(a.correct, c.correct)
    assert int(a.correct.max()) <= 10 and int(a.correct.min()) >= 0


def _with_trained_weights(name, digits, trained):
    """The defense's deployed classifier around a trained network: the plainly trained
    small-cnn's weights loaded into the defense's stochastic architecture, whose noise
    parameters keep their initial values (training every defense here would cost minutes)."""
    defense = create_defense(name, eps_data=digits.eps)
    model = defense.prepare_model(small_model(digits))
    result = model.load_state_dict(trained.state_dict(), strict=False)
    assert not result.unexpected_keys
    return defense.deployed(model).eval()  # the classifier the defense deploys (stn: with its noise)


def _accuracy(rows, label):
    """Mean over examples of min(clean score, attack score) and the per-example scores."""
    def scores(lab):
        r = rows[lab]
        return [k / d if d else 0.0 for k, d in zip(r["draws_correct"], r["draws"])]
    clean, attacked = scores(CLEAN), scores(label)
    per = [min(c, a) for c, a in zip(clean, attacked)]
    return sum(per) / len(per), per


@pytest.mark.parametrize("name", sorted(KNOWN_STOCHASTIC))
def test_eot_attacks_are_never_weaker_than_without_eot(name, digits, trained_digits_model):
    """On every registered stochastic defense (around trained weights), PGD and APGD with EOT
    leave at most the accuracy of the same attack without EOT, beyond a paired 95% interval."""
    model = _with_trained_weights(name, digits, trained_digits_model)
    eps = 0.1
    attacks = ["pgd-5:eot_samples=1", "pgd-5:eot_samples=8",
               "apgd-ce:steps=8,eot_samples=1", "apgd-ce:steps=8,eot_samples=8"]
    specs = parse_attacks(attacks, eps)
    rows = evaluate_shard(model, digits.test, range(48), specs, eps, CPU, seed=0, batch_size=48,
                          votes=10, large_eps_examples=0, check_examples=0)
    assert all(rows[CLEAN]["stochastic"])
    labels = [spec.label for spec in specs]
    for plain, eot in (labels[:2], labels[2:]):
        acc_plain, per_plain = _accuracy(rows, plain)
        acc_eot, per_eot = _accuracy(rows, eot)
        diffs = torch.tensor([e - p for e, p in zip(per_eot, per_plain)], dtype=torch.float64)
        half_width = 1.96 * diffs.std().item() / len(diffs) ** 0.5
        assert acc_eot <= acc_plain + half_width + 1e-9, \
            f"{name}: {eot} {100 * acc_eot:.1f}% > {plain} {100 * acc_plain:.1f}% (+-{100 * half_width:.1f})"


def test_cascade_survivors_are_the_examples_with_a_running_score_above_zero(trained_digits_model, digits):
    """The cascade's rule on a stochastic model: an attack runs on exactly the examples whose
    minimum score over clean and every earlier attack is above 0, and ``robust`` records it;
    skipped rows carry no draws."""
    model = NoisyInput(trained_digits_model, sigma=0.25).eval()
    specs = parse_attacks(["fgsm:eot_samples=2", "pgd-3:eot_samples=2"], 0.2)
    rows = evaluate_shard(model, digits.test, range(48), specs, 0.2, CPU, seed=0, batch_size=48,
                          protocol="cascade", votes=6, large_eps_examples=0, check_examples=0)

    def score(label):
        r = rows[label]
        return [k / d if d else 0.0 for k, d in zip(r["draws_correct"], r["draws"])]
    fgsm, pgd = specs[0].label, specs[1].label
    running = [min(c, f) for c, f in zip(score(CLEAN), score(fgsm))]
    assert rows[pgd]["attacked"] == [r > 0 for r in running]
    assert rows[fgsm]["robust"] == [r > 0 for r in running]
    assert 0 < sum(r > 0 for r in running) < 48  # both kinds of example are there
    assert all(d == 0 for d, a in zip(rows[pgd]["draws"], rows[pgd]["attacked"]) if not a)
    assert all(d == 6 for d, a in zip(rows[pgd]["draws"], rows[pgd]["attacked"]) if a)
    fractional = [s for s in score(CLEAN) if 0 < s < 1]
    assert fractional  # the verdict's R draws really disagree on some examples
