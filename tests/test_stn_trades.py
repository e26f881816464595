"""STN (Li et al. 2019, section 5.1) and TRADES (Zhang et al. 2019): the properties
their losses rely on, the noise and the inner maximisation, and their presets."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import quick_config, small_model
import torch.nn.functional as F
from torch import nn

from robust.data import create_dataset
from robust.defenses import create_defense
from robust.defenses.base import TrainStep
from robust.defenses.stn import sample_noise, stability_loss
from robust.defenses.trades import STEP_FRACTION, kl_divergence
from robust.presets import get_preset
from robust.train import fit
from tuning import search_module

CPU = torch.device("cpu")
_model = small_model

def _cfg(**kw):
    return quick_config(**{"val_attack_steps": 2, **kw})


@pytest.fixture(scope="module")
def synthetic():
    return create_dataset("synthetic")




def _step(model, splits, seed=0, n=32):
    x, y, index = splits.train.batch(torch.arange(n))
    return TrainStep(model, model, x, y, index, epoch=1, generator=torch.Generator().manual_seed(seed))


# --- both defenses through the single loop --------------------------------------------------

@pytest.mark.parametrize("name,config", [("stn", {}), ("trades", {"steps": 2})])
def test_trains_one_epoch_reproducibly_from_the_seed(name, config):
    """Finite loss, parameters change, and the same seed gives the same weights (noise and
    random starts come from the loop's generator).  Both defenses at their defaults also run
    a full synthetic epoch in tests/test_defenses.py; here three batches and, for TRADES,
    two inner steps keep three runs fast."""
    splits = create_dataset("synthetic", max_train=192)
    before = {k: v.clone() for k, v in _model(splits).state_dict().items()}
    runs = [fit(_model(splits), create_defense(name, eps_data=splits.eps, **config), splits,
                _cfg(), seed=seed, device=CPU) for seed in (0, 0, 1)]
    (a, history), (b, _), (c, _) = runs
    assert math.isfinite(history[-1]["train_loss"])
    for k, _ in a.named_parameters():
        assert not torch.equal(a.state_dict()[k], before[k])
        torch.testing.assert_close(a.state_dict()[k], b.state_dict()[k], rtol=0, atol=0)
    assert any(not torch.equal(a.state_dict()[k], c.state_dict()[k]) for k, _ in a.named_parameters())


# --- STN ------------------------------------------------------------------------------------

def test_stn_with_gamma_zero_is_plain_cross_entropy_on_the_clean_batch(synthetic):
    model = _model(synthetic)
    step = _step(model, synthetic)
    out = create_defense("stn", gamma=0.0).loss(step)
    logits = model(step.x)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, step.y))
    torch.testing.assert_close(out.logits, logits)


def test_stn_loss_is_ce_plus_gamma_stability_and_reproducible_from_the_generator(synthetic):
    model = _model(synthetic)
    defense = create_defense("stn", sigma=0.5, gamma=2.0)
    same = [defense.loss(_step(model, synthetic, seed=3)).loss for _ in range(2)]
    other = defense.loss(_step(model, synthetic, seed=4)).loss
    assert same[0].item() == same[1].item()
    assert other.item() != same[0].item()
    step = _step(model, synthetic, seed=3)
    ce = F.cross_entropy(model(step.x), step.y)
    noise = sample_noise(step.x, "gaussian", 0.5, torch.Generator().manual_seed(3))
    expected = ce + 2.0 * stability_loss(model(step.x), model(step.x + noise))
    torch.testing.assert_close(same[0], expected)
    assert same[0].item() > ce.item()  # the stability term is a cross-entropy: >= H(p) >= 0


def test_stn_model_sees_unclipped_noisy_images(synthetic):
    """x' = x + noise in pixel space, not clipped to [0, 1]: the distribution that
    Algorithm 1 (and certification) classifies."""
    seen = []

    class Recorder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.inner(x)

    model = Recorder(_model(synthetic))
    step = _step(model, synthetic, seed=5)
    create_defense("stn", sigma=0.5).loss(step)
    clean, noisy = seen
    assert torch.equal(clean, step.x)
    assert noisy.min().item() < 0.0 and noisy.max().item() > 1.0
    expected = step.x + sample_noise(step.x, "gaussian", 0.5, torch.Generator().manual_seed(5))
    torch.testing.assert_close(noisy, expected)


def test_stability_gradient_reaches_only_the_noisy_branch():
    """The target P(y|x) is detached: d/d(clean logits) is zero, and d/d(noisy logits)
    equals that of KL(p(x) || p(x')), i.e. softmax(noisy) - softmax(clean)."""
    clean = torch.randn(4, 10, requires_grad=True)
    noisy = torch.randn(4, 10, requires_grad=True)
    g_clean, g_noisy = torch.autograd.grad(stability_loss(clean, noisy), [clean, noisy], allow_unused=True)
    assert g_clean is None or torch.count_nonzero(g_clean) == 0
    torch.testing.assert_close(g_noisy, (noisy.softmax(1) - clean.softmax(1)).detach() / 4)


def test_gaussian_noise_has_std_sigma():
    x = torch.zeros(400_000)
    z = sample_noise(x, "gaussian", 0.3, torch.Generator().manual_seed(0))
    assert z.shape == x.shape
    assert z.std().item() == pytest.approx(0.3, rel=0.01)
    assert z.mean().item() == pytest.approx(0.0, abs=0.003)


def test_laplace_noise_has_scale_lambda():
    """Laplace(0, lambda): E|z| = lambda, Var z = 2 lambda^2, symmetric about 0."""
    z = sample_noise(torch.zeros(400_000), "laplace", 0.3, torch.Generator().manual_seed(0))
    assert z.abs().mean().item() == pytest.approx(0.3, rel=0.01)
    assert z.std().item() == pytest.approx(math.sqrt(2) * 0.3, rel=0.01)
    assert z.mean().item() == pytest.approx(0.0, abs=0.003)
    assert torch.isfinite(z).all()


def test_noise_is_a_function_of_the_generator_state():
    x = torch.zeros(3, 1, 8, 8)
    a = sample_noise(x, "laplace", 0.2, torch.Generator().manual_seed(9))
    assert torch.equal(a, sample_noise(x, "laplace", 0.2, torch.Generator().manual_seed(9)))
    assert not torch.equal(a, sample_noise(x, "laplace", 0.2, torch.Generator().manual_seed(10)))
    with pytest.raises(ValueError, match="valid choices: gaussian, laplace"):
        sample_noise(x, "cauchy", 0.2, torch.Generator())


@pytest.mark.parametrize("bad", [{"sigma": 0.0}, {"sigma": -0.1}, {"gamma": -1.0}, {"noise": "cauchy"},
                                 {"sigma": float("nan")}])
def test_stn_rejects_invalid_settings(bad):
    with pytest.raises(ValueError):
        create_defense("stn", eps_data=8 / 255, **bad)


def test_stn_defaults_and_paper_preset():
    cfg = create_defense("stn", eps_data=8 / 255).config
    assert (cfg.sigma, cfg.gamma, cfg.noise) == (0.25, 1.0, "gaussian")
    paper = get_preset("stn", "paper")
    assert (paper.dataset, paper.model) == ("cifar10", "cnn7")       # section 6: seven conv layers
    assert paper.defense_config["sigma"] == pytest.approx(100 / 255)  # section 6.2
    create_defense("stn", eps_data=8 / 255, **paper.defense_config)


# --- TRADES ---------------------------------------------------------------------------------

def test_kl_divergence_is_nonnegative_and_zero_on_equal_outputs():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(64, 10, generator=g) * 5, torch.randn(64, 10, generator=g) * 5
    kl = kl_divergence(p, q)
    assert kl.shape == (64,) and (kl >= 0).all() and (kl > 0).all()
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(64), atol=1e-6, rtol=0)
    torch.testing.assert_close(kl, F.kl_div(q.log_softmax(1), p.log_softmax(1), reduction="none",
                                            log_target=True).sum(1))
    extreme = torch.tensor([[100.0, -100.0]])
    assert torch.isfinite(kl_divergence(extreme, -extreme)).all()  # underflowed probabilities


def test_trades_adversary_stays_in_the_ball_and_the_image_box(synthetic):
    model = _model(synthetic)
    step = _step(model, synthetic, n=64)
    assert step.x.min().item() == 0.0 and step.x.max().item() == 1.0  # the box constraint is active
    defense = create_defense("trades", eps_data=0.1, steps=5)
    x_adv = defense.adversary(torch.Generator().manual_seed(0))(model, step.x, step.y)
    assert (x_adv - step.x).abs().max().item() <= 0.1 + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    with torch.no_grad():
        clean = model(step.x)
        start = step.x + 1e-3 * torch.randn(step.x.shape, generator=torch.Generator().manual_seed(0))
        gained = kl_divergence(clean, model(x_adv)).mean() > 10 * kl_divergence(clean, model(start)).mean()
    assert gained  # the inner maximisation climbs the KL far above its start


def test_trades_inner_maximisation_leaves_no_parameter_gradients_and_restores_mode(synthetic):
    model = _model(synthetic).train()
    step = _step(model, synthetic)
    create_defense("trades", eps_data=0.1).adversary(step.generator)(model, step.x, step.y)
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_trades_loss_is_ce_plus_beta_kl(synthetic):
    """beta = 0 gives the clean cross-entropy; beta > 0 adds beta * KL >= 0 (same start)."""
    model = _model(synthetic)
    plain = create_defense("trades", eps_data=0.1, beta=0.0).loss(_step(model, synthetic, seed=1))
    logits = model(_step(model, synthetic).x)
    torch.testing.assert_close(plain.loss, F.cross_entropy(logits, _step(model, synthetic).y))
    robust = create_defense("trades", eps_data=0.1, beta=6.0).loss(_step(model, synthetic, seed=1))
    kl = (robust.loss - plain.loss) / 6.0
    assert kl.item() > 0.0
    step = _step(model, synthetic)
    x_adv = create_defense("trades", eps_data=0.1).adversary(torch.Generator().manual_seed(1))(
        model, step.x, step.y)
    torch.testing.assert_close(kl, kl_divergence(logits, model(x_adv)).mean())


@pytest.mark.parametrize("bad", [{"beta": -1.0}, {"steps": 0}, {"steps": 2.5}, {"eps": 0.0},
                                 {"step_size": -0.01}])
def test_trades_rejects_invalid_settings(bad):
    with pytest.raises(ValueError):
        create_defense("trades", eps_data=8 / 255, **bad)


def test_trades_defaults_and_paper_preset():
    """beta = 6, 10 steps; eps = eps_data, step = eps * 0.007/0.031 (their CIFAR-10 ratio)."""
    cfg = create_defense("trades", eps_data=0.031).config
    assert (cfg.beta, cfg.steps, cfg.eps) == (6.0, 10, 0.031)
    assert cfg.step_size == pytest.approx(0.007)
    assert create_defense("trades", eps_data=0.1).config.step_size == pytest.approx(0.1 * STEP_FRACTION)
    paper = get_preset("trades", "paper")
    assert (paper.dataset, paper.model, paper.model_config) == ("cifar10", "wrn-34-10", {"dropout": 0.0})
    assert (paper.train["lr"], paper.train["weight_decay"], paper.train["momentum"]) == (0.1, 2e-4, 0.9)
    assert create_defense("trades", eps_data=8 / 255, **paper.defense_config).config.step_size == 0.007


# --- search spaces --------------------------------------------------------------------------

@pytest.mark.parametrize("name,metric", [("stn", "val_certified_acc"), ("trades", "val_pgd_acc")])
def test_search_spaces_build_valid_defenses(name, metric):
    module = search_module(name)
    assert (module.METRIC, module.MODE) == (metric, "max")
    for space in (module.space(8 / 255), module.smoke_space(8 / 255)):
        for key, domain in space.items():
            for value in getattr(domain, "categories", [domain]):
                create_defense(name, eps_data=8 / 255, **{key: value})
    full, smoke = module.space(8 / 255), module.smoke_space(8 / 255)
    for key, domain in smoke.items():
        assert set(getattr(domain, "categories", [domain])) <= set(full[key].categories)
    if name == "trades":
        assert full["beta"].categories == [1.0, 3.0, 6.0]
