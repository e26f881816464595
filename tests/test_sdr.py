"""Stochastic-weight networks (Khan et al.): SDR-Decay (Algorithm 2), SDR-Learnable
(section 4.3), the variance thresholds and their schedule (Algorithm 3), and the
DropConnect baseline, through the conversion, the Ray-free loop and the evaluation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import quick_config

from robust.attacks.base import GradientAttack
from robust.defenses import create_defense
from robust.defenses.base import TrainStep
from robust.defenses.sdr import plateaued, sigma_pairs
from robust.evaluation.protocol import evaluate_shard
from robust.evaluation.suite import parse_attacks
from robust.models import create_model
from robust.models.stochastic import StochasticConv2d, StochasticLinear, stochastic_layers
from robust.presets import get_preset
from robust.train import TrainState, fit
from tuning import search_module

CPU = torch.device("cpu")
pytestmark = pytest.mark.timeout(120)


def _model(splits, name="mlp3", seed=0):
    torch.manual_seed(seed)
    return create_model(name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size, mean=splits.mean, std=splits.std)


def _cfg(**kw):
    return quick_config(**{"val_attack_steps": 1, **kw})


def _sdr(**kw):
    return create_defense("sdr", eps_data=0.1, **{"val_steps": 1, "val_eot_samples": 2, "val_examples": 16, **kw})


# --- the conversion ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp3", "small-cnn"])
@pytest.mark.parametrize("per_example", [False, True])
def test_sigma_zero_computes_exactly_the_deterministic_model(digits, name, per_example):
    x = digits.test.batch(torch.arange(16))[0]
    plain = _model(digits, name).eval()
    expected = plain(x)
    for defense in (_sdr(sigma_init=0.0, per_example=per_example),
                    create_defense("dropconnect", p=0.0, per_example=per_example)):
        model = defense.prepare_model(_model(digits, name))
        assert len(list(stochastic_layers(model))) == 4  # every Linear and Conv2d converted
        for mode in (model.eval, model.train):
            mode()
            assert torch.equal(model(x), expected)


@pytest.mark.parametrize("defense", [dict(name="sdr", sigma_init=0.05), dict(name="dropconnect", p=0.2)])
def test_passes_differ_between_calls_and_are_reproducible_under_a_seed(digits, defense):
    defense = dict(defense)
    model = create_defense(defense.pop("name"), **defense).prepare_model(_model(digits, "small-cnn")).eval()
    x = digits.test.batch(torch.arange(8))[0]
    torch.manual_seed(5)
    a, b = model(x), model(x)
    torch.manual_seed(5)
    again = model(x)
    assert not torch.equal(a, b)
    assert torch.equal(a, again)


def test_per_batch_draw_is_shared_and_per_example_draws_are_not(digits):
    x = digits.test.batch(torch.arange(1))[0].repeat(4, 1, 1, 1)
    for per_example, shared in ((False, True), (True, False)):
        model = _sdr(sigma_init=0.1, per_example=per_example).prepare_model(_model(digits)).eval()
        out = model(x)
        assert torch.allclose(out[0], out[1]) is shared
        assert model.noise_shared_in_batch is shared


@pytest.mark.parametrize("layer", [torch.nn.Linear(6, 3), torch.nn.Conv2d(2, 3, 3, padding=1, stride=2)])
def test_per_example_output_is_the_layer_with_each_examples_own_weights(layer):
    """Example n's output equals the plain layer evaluated with weight mu + delta_n, bias + db_n."""
    holder = torch.nn.Sequential(layer)
    _sdr(sigma_init=0.3, per_example=True).prepare_model(holder)
    stochastic = holder[0]
    assert isinstance(stochastic, (StochasticLinear, StochasticConv2d))
    x = torch.randn(5, 6) if isinstance(stochastic, StochasticLinear) else torch.randn(5, 2, 7, 7)
    torch.manual_seed(1)
    out = stochastic(x)
    torch.manual_seed(1)
    dw, db = stochastic.noise.deltas(stochastic, 5, None)
    for n in range(5):
        w, b = stochastic.weight + dw[n], stochastic.bias + db[n]
        ref = F.linear(x[n:n + 1], w, b) if x.dim() == 2 else F.conv2d(x[n:n + 1], w, b, stride=2, padding=1)
        torch.testing.assert_close(out[n:n + 1], ref, rtol=1e-5, atol=1e-5)


def test_rebuilt_model_loads_the_trained_state_and_predicts_the_same_under_a_seed(digits):
    trained, _ = fit(_model(digits), _sdr(), digits, _cfg(), seed=0, device=CPU)
    rebuilt = _sdr().prepare_model(_model(digits, seed=7))
    rebuilt.load_state_dict(trained.state_dict(), strict=True)
    x = digits.test.batch(torch.arange(16))[0]
    torch.manual_seed(3)
    a = trained.eval()(x)
    torch.manual_seed(3)
    assert torch.equal(rebuilt.eval()(x), a)


# --- SDR-Decay (Algorithm 2) and SDR-Learnable (section 4.3) -----------------------------------

def test_decay_sigma_follows_the_update_rule_and_decays_every_tau_steps(digits):
    beta, zeta, tau = 0.3, 0.5, 2
    defense = _sdr(variant="decay", beta=beta, zeta=zeta, tau=tau, sigma_init=0.02, sigma_max=10.0)
    model = defense.prepare_model(_model(digits))
    optimizer = torch.optim.SGD(defense.param_groups(model), lr=0.1)
    sigmas = [s for _, s in sigma_pairs(model)]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(s.requires_grad or id(s) in in_optimizer for s in sigmas)
    x, y, index = digits.train.batch(torch.arange(32))
    for step in range(1, 5):
        before = [s.clone() for s in sigmas]
        optimizer.zero_grad()
        defense.loss(TrainStep(model, model, x, y, index, 1, torch.Generator().manual_seed(step))).loss.backward()
        optimizer.step()
        defense.after_step(model, optimizer, step)
        for (mu, sigma), old in zip(sigma_pairs(model), before):
            expected = old + beta * mu.grad.abs()
            if step % tau == 0:
                expected = expected * zeta
            torch.testing.assert_close(sigma, expected.clamp(0.0, 10.0), rtol=1e-6, atol=1e-9)
            assert mu.grad.abs().sum() > 0  # the rule was exercised


def test_decay_counts_steps_over_the_whole_run_not_per_epoch(digits):
    """beta = 0: sigma = sigma_init * zeta^floor(total steps / tau), with the counter
    running across epochs (a per-epoch counter would decay fewer times)."""
    cfg = _cfg(epochs=3, batch_size=256)
    steps_per_epoch = math.ceil(len(digits.train) / 256)
    tau = steps_per_epoch + 1
    assert (3 * steps_per_epoch) // tau != 3 * (steps_per_epoch // tau)
    module, _ = fit(_model(digits), _sdr(variant="decay", beta=0.0, zeta=0.5, tau=tau, sigma_init=0.4),
                    digits, cfg, seed=0, device=CPU)
    expected = 0.4 * 0.5 ** ((3 * steps_per_epoch) // tau)
    for _, sigma in sigma_pairs(module):
        torch.testing.assert_close(sigma, torch.full_like(sigma, expected))


def test_learnable_sigma_receives_gradients_and_is_learned_without_weight_decay(digits):
    defense = _sdr(variant="learnable", sigma_init=0.05)
    model = defense.prepare_model(_model(digits))
    groups = defense.param_groups(model)
    sigma_ids = {id(s) for _, s in sigma_pairs(model)}
    assert {id(p) for p in groups[1]["params"]} == sigma_ids and groups[1]["weight_decay"] == 0.0
    x, y, index = digits.train.batch(torch.arange(32))
    defense.loss(TrainStep(model, model, x, y, index, 1, torch.Generator().manual_seed(0))).loss.backward()
    for _, sigma in sigma_pairs(model):
        assert sigma.grad is not None and sigma.grad.abs().sum() > 0
    trained, _ = fit(_model(digits), _sdr(variant="learnable", sigma_init=0.05), digits, _cfg(), seed=0, device=CPU)
    assert any(not torch.allclose(s, torch.full_like(s, 0.05)) for _, s in sigma_pairs(trained))


# --- thresholds (Algorithm 3) and their schedule (section 4.3) ---------------------------------

class _Recording:
    """Wraps a defense's after_step to check the thresholds after every optimiser step."""

    def __init__(self, defense):
        self.defense, self.steps, self.at_bound = defense, 0, False
        original = defense.after_step

        def after_step(module, optimizer, step):
            original(module, optimizer, step)
            for _, s in sigma_pairs(module):  # the bounds as the sigmas' dtype represents them
                lo, hi = (torch.tensor(b, dtype=s.dtype) for b in (defense.sigma_min, defense.sigma_max))
                assert bool((s >= lo).all() and (s <= hi).all())
                self.at_bound |= bool((s == hi).any() or (s == lo).any())
            self.steps += 1
        defense.after_step = after_step


@pytest.mark.parametrize("variant", ["decay", "learnable"])
def test_sigma_stays_within_the_thresholds_after_every_step(digits, variant):
    defense = _sdr(variant=variant, sigma_init=0.5, sigma_min=0.02, sigma_max=0.1, beta=1.0)
    rec = _Recording(defense)
    fit(_model(digits), defense, digits, _cfg(lr=0.05), seed=0, device=CPU)
    assert rec.steps > 0 and rec.at_bound  # the clamp was active, not vacuous


def test_plateau_rule():
    assert plateaued([0.5, 0.6, 0.6, 0.6, 0.6], patience=3, min_gain=0.001)
    assert not plateaued([0.5, 0.6, 0.6, 0.6, 0.7], patience=3, min_gain=0.001)
    assert not plateaued([0.6, 0.6, 0.6], patience=3, min_gain=0.001)  # too few epochs


def test_schedule_raises_only_on_plateau_and_never_twice_within_five_epochs():
    flat = _sdr(patience=2, min_gain=0.001)
    raised = [e for e in range(1, 31) if flat.schedule_step(e, 0.8)]
    assert raised and raised[0] == 3  # epochs 2-3 gain nothing over epoch 1
    assert all(b - a >= 5 for a, b in zip(raised, raised[1:]))
    assert flat.sigma_min == pytest.approx(0.05 * len(raised))
    assert flat.sigma_max == pytest.approx(1.0 + 0.05 * len(raised))
    rising = _sdr(patience=2, min_gain=0.001)
    assert not any(rising.schedule_step(e, 0.5 + 0.01 * e) for e in range(1, 31))
    assert (rising.sigma_min, rising.sigma_max) == (0.0, 1.0)
    assert not any(_sdr(variant="decay").schedule_step(e, 0.8) for e in range(1, 31))  # off for decay


def test_thresholds_and_mean_sigmas_are_logged_and_the_schedule_state_resumes(digits, tmp_path):
    """Flat validation accuracy (lr tiny) raises the bounds; a run stopped after epoch 4
    and resumed ends exactly where the uninterrupted run does (sigma, thresholds, counter)."""
    cfg = _cfg(epochs=5, lr=1e-6, val_attack_every=100)  # validation attacks at the last epoch only
    make = lambda: _sdr(patience=1, min_gain=0.5, sigma_init=0.0)  # noqa: E731  every epoch "plateaus"
    full, history = fit(_model(digits), make(), digits, cfg, seed=0, device=CPU)
    assert [h["sigma_raised"] for h in history] == [0, 1, 0, 0, 0]  # epoch 2, then five-epoch cooldown
    assert history[-1]["sigma_min"] == pytest.approx(0.05) and history[0]["sigma_min"] == 0.0
    layers = [f"sigma_mean/{name}" for name, _ in stochastic_layers(full)] + ["sigma_mean"]
    assert all(math.isfinite(h[k]) for h in history for k in layers)
    assert history[-1][layers[0]] >= 0.05  # the raised minimum reached every sigma
    states = []
    fit(_model(digits), make(), digits, _cfg(epochs=4, lr=1e-6, val_attack_every=100), seed=0, device=CPU,
        on_epoch_end=lambda m, state_fn: states.append(state_fn()))
    resumed, resumed_history = fit(_model(digits, seed=9), make(), digits, cfg, seed=0, device=CPU,
                                   resume=TrainState(**states[-1]))
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    assert resumed_history[-1]["sigma_min"] == history[-1]["sigma_min"]
    _check_plot_of_logged_metrics(history, tmp_path)


def _check_plot_of_logged_metrics(history, tmp_path):
    """The stored per-epoch rows give the thresholds and mean sigmas per trial, and a PNG."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from robust.results.epochs import epoch_metric_curves, plot_epoch_metrics
    from robust.results.schema import train_path, write_table

    fs, root = pafs.LocalFileSystem(), str(tmp_path / "exp")
    write_table(fs, train_path(root, "sdr", "t1"), pa.Table.from_pylist(history), {})
    write_table(fs, train_path(root, "standard", "t0"), pa.Table.from_pylist(
        [{"epoch": 1, "val_acc": 0.5}]), {})  # another schema, nothing matches: skipped
    curves = epoch_metric_curves(fs, root, "sigma_m*")
    assert [c["trial"] for c in curves] == ["t1"]
    assert curves[0]["epochs"] == [h["epoch"] for h in history]
    assert curves[0]["metrics"]["sigma_min"] == [h["sigma_min"] for h in history]
    assert "sigma_mean/body.1" in curves[0]["metrics"] and "sigma_raised" not in curves[0]["metrics"]
    png = tmp_path / "sigma.png"
    plot_epoch_metrics(curves, str(png), {}, "sigma_m*")
    assert png.stat().st_size > 0


# --- evaluation: single pass, majority vote, EOT ----------------------------------------------

def test_evaluation_reports_single_pass_and_majority_vote_reproducibly(digits):
    model = _sdr(sigma_init=0.2).prepare_model(_model(digits))
    attacks = parse_attacks(["fgsm"], digits.eps)
    rows = [evaluate_shard(model, digits.test, range(64), attacks, digits.eps, CPU, seed=4, batch_size=32,
                           votes=5, large_eps_examples=0) for _ in range(2)]
    clean = rows[0]["clean"]
    assert all(clean["stochastic"])
    assert clean["prediction"] != clean["vote_prediction"]  # a vote over 5 draws is not one draw
    assert rows[0] == rows[1]  # seeded per batch


def test_eot_gives_every_sample_its_own_weight_draw(digits):
    """Stacking the S EOT copies into one forward would share one per-batch draw: the EOT
    machinery finds that out (its probe, cached per model) and makes one pass per copy."""
    for per_example, passes in ((False, 6), (True, 1)):
        model = _sdr(sigma_init=0.1, per_example=per_example).prepare_model(_model(digits)).eval()
        calls = []
        model.register_forward_hook(lambda *_: calls.append(1))
        x, y, _ = digits.test.batch(torch.arange(4))
        attack = GradientAttack(eot_samples=6, eot_chunk=10_000)
        attack.copies_per_pass(model, x)  # the probe
        calls.clear()
        attack.input_gradient(model, x, y)
        assert len(calls) == passes


# --- configuration, preset, search space --------------------------------------------------------

@pytest.mark.parametrize("name,bad,match", [
    ("sdr", {"beta": -0.1}, "beta must be >= 0"),
    ("sdr", {"zeta": 0.0}, r"zeta must lie in \(0, 1\]"),
    ("sdr", {"zeta": 1.5}, r"zeta must lie in \(0, 1\]"),
    ("sdr", {"sigma_min": 0.5, "sigma_max": 0.2}, "must not exceed sigma_max"),
    ("sdr", {"variant": "bayes"}, "valid choices: decay, learnable"),
    ("sdr", {"tau": 0}, "tau must be an integer >= 1"),
    ("dropconnect", {"p": 1.0}, r"p must lie in \[0, 1\)"),
])
def test_invalid_settings_are_clear_errors(name, bad, match):
    with pytest.raises(ValueError, match=match):
        create_defense(name, **bad)


def test_paper_preset_is_the_papers_mlp_on_mnist():
    for defense in ("sdr", "dropconnect"):
        preset = get_preset(defense, "paper")
        assert (preset.dataset, preset.model) == ("mnist", "mlp3")
    assert get_preset("dropconnect", "paper").defense_config["p"] == 0.2
    model = create_model("mlp3", in_channels=1, image_size=28)
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(784, 100), (100, 100), (100, 100), (100, 10)]  # section 5


@pytest.mark.parametrize("defense", ["sdr", "dropconnect"])
def test_every_search_space_value_is_a_valid_configuration(defense):
    module = search_module(defense)
    for space in (module.space(0.1), module.smoke_space(0.1)):
        for key, domain in space.items():
            for value in getattr(domain, "categories", [domain]):
                create_defense(defense, **{key: value})
    assert module.MODE == "max"
