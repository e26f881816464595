"""Learn2Perturb (Jeddi et al. 2020), Learn2Perturb-R and PNI-W (He et al. 2019): the
properties Algorithm 1 and equations 4-11 rely on, through the Ray-free loop on digits."""
from __future__ import annotations

import copy
import math

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from launch_probe import probe
from torch import nn

from robust.data import create_dataset
from robust.defenses import create_defense
from robust.defenses.base import TrainStep
from robust.defenses.learn2perturb import (
    FeatureNoise,
    PAPER_STEP_FRACTION,
    harmonic_tau,
    mixed_adversarial_loss,
    noise_generator,
)
from robust.defenses.pni import NoisyConv2d, NoisyLinear
from robust.attacks.pgd import PGD
from robust.evaluation.protocol import is_stochastic
from robust.models import create_model
from robust.presets import get_preset
from robust.results.noise import noise_curves, plot_noise
from robust.seeding import derive_seed
from robust.train import TrainConfig, TrainState, fit
from robust.train.loop import build_optimizer

pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")
FAST = dict(steps=1, val_examples=16, val_eot_steps=1, val_eot_samples=2)


@pytest.fixture(scope="module")
def digits():
    return create_dataset("digits", max_train=128)


def _model(splits, name="small-cnn", seed=0):
    torch.manual_seed(seed)
    return create_model(name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size, mean=splits.mean, std=splits.std)


def _sgd(**kw):
    base = dict(epochs=1, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0,
                schedule="constant", val_attack_steps=1)
    return TrainConfig(**{**base, **kw})


def _thetas(module):
    return [m.theta.detach().clone() for m in module.modules() if isinstance(m, FeatureNoise)]


# --- tau, theta_min, growth ------------------------------------------------------------------

@pytest.mark.parametrize("warmup", [0, 3, 20])
def test_tau_is_the_harmonic_number_of_the_noisy_epochs(warmup):
    assert harmonic_tau(warmup + 1, warmup) == 1.0
    assert harmonic_tau(warmup + 2, warmup) == 1.5
    assert harmonic_tau(warmup + 3, warmup) == pytest.approx(11 / 6)
    with pytest.raises(ValueError, match="after the warm-up"):
        harmonic_tau(warmup, warmup)


def test_theta_never_drops_below_theta_min_where_training_would_take_it_below(digits):
    """Without the bound (theta_min = 0) the classification gradient pushes some thetas
    below their start; with theta_min = start none goes below and those sit at the bound."""
    cfg = _sgd(lr=2.0)
    runs = {}
    for theta_min in (0.0, 0.05):
        defense = create_defense("learn2perturb", eps_data=digits.eps, gamma=0.0, theta_init=0.05,
                                 theta_min=theta_min, alpha=1.0, beta=0.0, **FAST)
        module, _ = fit(_model(digits), defense, digits, cfg, seed=0, device=CPU)
        runs[theta_min] = torch.cat([t.flatten() for t in _thetas(module)])
    bound = torch.tensor(0.05)  # float32, as theta
    assert bool((runs[0.0] < bound).any())
    assert bool(runs[0.05].min() == bound)
    assert bool((runs[0.05] > bound).any())


def test_after_step_projects_theta_up_to_theta_min(digits):
    defense = create_defense("learn2perturb", eps_data=digits.eps, theta_min=0.02)
    module = defense.prepare_model(_model(digits))
    with torch.no_grad():
        for t in defense.thetas():
            t.uniform_(-1.0, 1.0)
    expected = [t.detach().clamp(min=0.02) for t in defense.thetas()]
    defense.after_step(module, None, 1)
    for t, e in zip(defense.thetas(), expected):
        assert torch.equal(t.detach(), e)


def test_with_zero_classification_gradient_the_regulariser_makes_theta_grow(digits):
    """Learn2Perturb-R: the classification loss sees theta as a constant, so every step is
    theta += lr * gamma / (2 tau sqrt(theta)), the gradient of -gamma sqrt(theta) / tau."""
    gamma, lr, theta0 = 1e-2, 0.5, 0.25
    cfg = _sgd(lr=lr, epochs=2)
    defense = create_defense("learn2perturb-r", eps_data=digits.eps, gamma=gamma, theta_init=theta0, **FAST)
    module, history = fit(_model(digits), defense, digits, cfg, seed=0, device=CPU)
    steps_per_epoch = math.ceil(len(digits.train) / cfg.batch_size)
    expected = torch.tensor(theta0)
    for epoch in (1, 2):
        for _ in range(steps_per_epoch):
            expected = expected + lr * gamma / (2 * harmonic_tau(epoch, 0) * expected.sqrt())
    for theta in _thetas(module):
        torch.testing.assert_close(theta, expected.expand_as(theta), rtol=1e-5, atol=0)
    means = [row["noise_mean"] for row in history]
    assert theta0 < means[0] < means[1]


# --- Algorithm 1: two updates from one point --------------------------------------------------

def _batch_step(module, splits, epoch=1, seed=0, n=32):
    x, y, index = splits.train.batch(torch.arange(n))
    return TrainStep(module, module, x, y, index, epoch, torch.Generator().manual_seed(seed))


def test_w_and_theta_updates_are_separate_and_use_gradients_from_the_same_point(digits):
    """The loop's one optimiser step over [W, theta] equals applying the W update (theta
    untouched, bit for bit) and then the theta update (W untouched) with the gradients of
    ONE backward pass at (W0, theta0); theta's gradient is the classification gradient
    plus exactly gamma * dg/dtheta = -gamma / (2 tau sqrt(theta))."""
    cfg = TrainConfig(epochs=2, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    defense = create_defense("learn2perturb", eps_data=digits.eps, gamma=0.05, **FAST)
    module = defense.prepare_model(_model(digits))
    groups = defense.param_groups(module)
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    theta_ids = {id(t) for t in defense.thetas()}
    assert {id(p) for p in groups[1]["params"]} == theta_ids
    assert not theta_ids & {id(p) for p in groups[0]["params"]}

    defense.loss(_batch_step(module, digits, epoch=2)).loss.backward()  # tau(2) = 1.5
    start = copy.deepcopy(module)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}

    # Reference: the classification gradient alone at the same point (same noise, same PGD start).
    ref_defense = create_defense("learn2perturb", eps_data=digits.eps, gamma=0.0, **FAST)
    ref = ref_defense.prepare_model(_model(digits))
    ref.load_state_dict(start.state_dict())
    ref_defense.loss(_batch_step(ref, digits, epoch=2)).loss.backward()
    for (name, p), t in zip(ref.named_parameters(), module.parameters()):
        if ".theta" in name:
            torch.testing.assert_close(grads[name] - p.grad, -0.05 / (2 * 1.5 * t.detach().sqrt()),
                                       rtol=1e-4, atol=1e-9)
        else:
            assert torch.equal(grads[name], p.grad)  # the regulariser never reaches W

    def sgd(params):
        return build_optimizer([{"params": params}], cfg)

    two = copy.deepcopy(start)
    for p, (name, _) in zip(two.parameters(), start.named_parameters()):
        p.grad = grads[name].clone()
    w = [p for n, p in two.named_parameters() if ".theta" not in n]
    th = [p for n, p in two.named_parameters() if ".theta" in n]
    before_theta = [t.detach().clone() for t in th]
    sgd(w).step()  # the W update
    assert all(torch.equal(a, b.detach()) for a, b in zip(before_theta, th))
    after_w = [p.detach().clone() for p in w]
    assert any(not torch.equal(a, b.detach()) for a, b in zip(after_w, start.parameters()))
    opt = build_optimizer([{"params": th, "weight_decay": 0.0}], cfg)
    opt.step()  # the theta update, with the gradient taken at W0
    assert all(torch.equal(a, b.detach()) for a, b in zip(after_w, w))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before_theta, th))

    one = copy.deepcopy(start)  # what the loop does: one step over both groups
    for p, (name, _) in zip(one.parameters(), start.named_parameters()):
        p.grad = grads[name].clone()
    build_optimizer(defense.param_groups(one), cfg).step()
    for a, b in zip(one.parameters(), two.parameters()):
        assert torch.equal(a, b)


# --- noise at inference -----------------------------------------------------------------------

@pytest.mark.parametrize("defense_name", ["learn2perturb", "learn2perturb-r", "pni"])
def test_two_forward_passes_differ_and_the_same_seed_reproduces_them(digits, defense_name):
    module = create_defense(defense_name, eps_data=digits.eps).prepare_model(_model(digits)).eval()
    x = digits.test.batch(torch.arange(8))[0]
    with torch.no_grad():
        a, b = module(x), module(x)
        torch.manual_seed(5)
        c = module(x)
        torch.manual_seed(5)
        d = module(x)
    assert not torch.equal(a, b)
    assert torch.equal(c, d)
    assert is_stochastic(module, x)


def test_theta_gets_gradients_in_training_passes_only(digits):
    """Attacks and evaluation run in eval mode: the noise stays, theta is a constant there."""
    defense = create_defense("learn2perturb", eps_data=digits.eps)
    module = defense.prepare_model(_model(digits))
    x, y = digits.test.batch(torch.arange(8))[:2]
    module.eval()
    xa = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(module(xa), y).backward()
    assert xa.grad is not None and xa.grad.abs().sum() > 0
    assert all(t.grad is None for t in defense.thetas())
    with torch.no_grad():
        assert not torch.equal(module(x), module(x))  # noise still drawn in eval mode
    module.train()
    torch.nn.functional.cross_entropy(module(x), y).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in defense.thetas())


@pytest.mark.parametrize("model_name,blocks,post_activation", [
    ("resnet20", 9, True), ("preact-resnet18", 8, False), ("wrn-16-4", 6, False)])
def test_noise_sits_at_every_block_output_before_the_final_activation(digits, model_name, blocks,
                                                                      post_activation):
    """One module per residual block (A.1), per element of the block's output, before the
    ReLU of post-activation blocks (outputs stay >= 0) and at the output of pre-activation
    blocks (huge noise makes outputs negative); the plain model's parameters are unchanged."""
    model = _model(digits, model_name)
    plain = sum(p.numel() for p in model.parameters())
    defense = create_defense("learn2perturb", eps_data=digits.eps, theta_init=100.0)
    module = defense.prepare_model(model).eval()
    noise = [m for m in module.modules() if isinstance(m, FeatureNoise)]
    assert len(noise) == blocks
    outputs = []
    handles = [blk.register_forward_hook(lambda _m, _i, out: outputs.append(out))
               for blk in module.modules() if isinstance(getattr(blk, "sum_hook", None), FeatureNoise)]
    with torch.no_grad():
        module(digits.test.batch(torch.arange(4))[0])
    for h in handles:
        h.remove()
    assert [tuple(o.shape[1:]) for o in outputs] == [tuple(m.theta.shape) for m in noise]
    assert all(bool((o >= 0).all()) for o in outputs) == post_activation
    assert plain == sum(p.numel() for n, p in module.named_parameters() if ".theta" not in n)


def test_models_without_blocks_get_noise_after_every_hidden_activation(digits):
    module = create_defense("learn2perturb", eps_data=digits.eps).prepare_model(_model(digits, "mlp3"))
    noise = [m for m in module.modules() if isinstance(m, FeatureNoise)]
    assert [tuple(m.theta.shape) for m in noise] == [(100,)] * 3
    relus = [m for m in module.modules() if isinstance(m, nn.ReLU)]
    pairs = [s for s in module.modules() if isinstance(s, nn.Sequential) and len(s) == 2
             and isinstance(s[0], nn.ReLU) and isinstance(s[1], FeatureNoise)]
    assert len(relus) == len(pairs) == 3


# --- PNI ---------------------------------------------------------------------------------------

def test_pni_scales_get_no_regulariser_gradient_and_share_the_weights_optimizer_step(digits):
    defense = create_defense("pni", eps_data=digits.eps, **FAST)
    module = defense.prepare_model(_model(digits))
    layers = [m for m in module.modules() if isinstance(m, (NoisyConv2d, NoisyLinear))]
    assert len(layers) == 4 and all(float(m.alpha.detach()) == 0.25 for m in layers)
    start = copy.deepcopy(module)
    step = _batch_step(module, digits)
    defense.loss(step).loss.backward()
    # The loss is equation 11 and nothing else: the same passes by hand give the same gradient.
    by_hand = copy.deepcopy(start)
    attack = PGD(eps=digits.eps, step_size=digits.eps * PAPER_STEP_FRACTION, steps=1, random_start=True,
                 seed=derive_seed(1, 1, int(step.index[0])))
    hand_step = _batch_step(by_hand, digits)
    with noise_generator(by_hand, hand_step.generator):
        mixed_adversarial_loss(hand_step, 0.5, 0.5, attack).loss.backward()
    for (name, p), q in zip(module.named_parameters(), by_hand.parameters()):
        assert torch.equal(p.grad, q.grad), name
    # One optimiser, one step: the scales move together with the weights; after_step is a no-op.
    cfg = _sgd(weight_decay=5e-4)
    optimizer = build_optimizer(defense.param_groups(module), cfg)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["weight_decay"] == 0.0
    optimizer.step()
    defense.after_step(module, optimizer, 1)
    for m, m0 in zip(layers, [m for m in start.modules() if isinstance(m, (NoisyConv2d, NoisyLinear))]):
        torch.testing.assert_close(m.alpha.detach(), m0.alpha.detach() - 0.1 * m.alpha.grad, rtol=0, atol=1e-7)
        assert not torch.equal(m.weight, m0.weight)


# --- through the loop: logging, selection metric, resume --------------------------------------

@pytest.mark.parametrize("defense_name", ["learn2perturb", "pni"])
def test_fit_logs_mean_noise_per_layer_and_the_eot_selection_metric(digits, defense_name):
    defense = create_defense(defense_name, eps_data=digits.eps, **FAST)
    module, history = fit(_model(digits), defense, digits, _sgd(epochs=2), seed=0, device=CPU)
    layers = [k for k in history[-1] if k.startswith("noise_mean/")]
    assert len(layers) == (3 if defense_name == "learn2perturb" else 4)
    assert all(0.0 <= row["val_eot_pgd_acc"] <= 1.0 for row in history)
    a = defense.validation_metrics(module, digits.val, CPU, seed=3)
    b = defense.validation_metrics(module, digits.val, CPU, seed=3)
    assert a == b  # seeded: the same model and seed give the same selection metric


def test_warmup_epochs_draw_no_noise_and_leave_theta_alone(digits):
    defense = create_defense("learn2perturb", eps_data=digits.eps, warmup_epochs=1, gamma=1e-2, **FAST)
    _, history = fit(_model(digits), defense, digits, _sgd(epochs=2), seed=0, device=CPU)
    theta0 = defense.config.theta_init
    assert history[0]["noise_mean"] == pytest.approx(theta0) and history[0]["noise_tau"] == 0.0
    assert history[1]["noise_mean"] != pytest.approx(theta0) and history[1]["noise_tau"] == 1.0


def test_resume_continues_exactly(digits):
    """Two epochs straight equal one epoch, a checkpoint, and a resumed second epoch."""
    cfg = _sgd(epochs=2, momentum=0.9)
    config = dict(eps_data=digits.eps, warmup_epochs=1, gamma=1e-2, **FAST)
    saved = {}

    def keep(metrics, state_fn):
        if metrics["epoch"] == 1:
            saved.update(state_fn())

    straight, h1 = fit(_model(digits), create_defense("learn2perturb", **config), digits, cfg, seed=0,
                       device=CPU, on_epoch_end=keep)
    assert saved["defense"] == {"epoch": 1, "batches": 2}
    resumed, h2 = fit(_model(digits, seed=9), create_defense("learn2perturb", **config), digits, cfg, seed=0,
                      device=CPU, resume=TrainState(**saved))
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert h1[-1]["noise_mean"] == h2[-1]["noise_mean"]


# --- configuration, presets, plot -------------------------------------------------------------

@pytest.mark.parametrize("name,bad,message", [
    ("learn2perturb", {"gamma": -1e-4}, "gamma must be >= 0"),
    ("learn2perturb", {"theta_min": -0.01}, "theta_min must be >= 0"),
    ("learn2perturb", {"theta_init": 0.001}, "theta_init must be >= theta_min"),
    ("learn2perturb", {"warmup_epochs": -1}, "warmup_epochs must be an integer >= 0"),
    ("learn2perturb-r", {"alpha": 0.0, "beta": 0.0}, "not both 0"),
    ("pni", {"granularity": "neuron"}, "valid choices: layer, channel, element"),
    ("pni", {"scale_init": -0.1}, "scale_init must be >= 0"),
])
def test_bad_configurations_are_refused_with_a_clear_message(name, bad, message):
    with pytest.raises(ValueError, match=message):
        create_defense(name, eps_data=8 / 255, **bad)


def test_a_warmup_not_shorter_than_the_run_is_refused(digits):
    defense = create_defense("learn2perturb", eps_data=digits.eps, warmup_epochs=2)
    with pytest.raises(ValueError, match=r"warmup_epochs \(2\) must be shorter than the run \(2 epochs\)"):
        fit(_model(digits), defense, digits, _sgd(epochs=2), seed=0, device=CPU)
    result = probe("tune", {"warmup": ["--defense", "learn2perturb", "--epochs", "2", "--set", "warmup_epochs=2"],
                            "gamma": ["--defense", "learn2perturb", "--set", "gamma=-1"]})
    for case in result.values():
        assert case["code"] == 2 and not case["ray"]
    assert "must be shorter than the run" in result["warmup"]["stderr"]
    assert "gamma must be >= 0" in result["gamma"]["stderr"]


def test_paper_preset_follows_a4():
    p = get_preset("learn2perturb", "paper")
    assert p.model == "resnet20" and p.dataset == "cifar10"
    assert p.train["epochs"] == 350 and p.train["nesterov"] and p.train["weight_decay"] == 1e-4
    assert [round(f * 350) for f in p.train["milestones"]] == [150, 250]
    defense = create_defense("learn2perturb", eps_data=8 / 255, **p.defense_config)
    assert defense.config.gamma == 1e-4 and defense.config.warmup_epochs == 20
    assert (defense.config.alpha, defense.config.beta, defense.config.steps) == (0.5, 0.5, 7)
    assert defense.config.step_size == pytest.approx(0.01)


def test_noise_curves_are_read_back_from_the_epoch_rows_and_plotted(tmp_path):
    root = tmp_path / "exp"
    for defense, trial, values in (("pni", "t1", [0.25, 0.1, 0.02]), ("learn2perturb", "t2", [0.25, 0.3, 0.4])):
        d = root / "data" / "train" / f"defense={defense}" / f"trial={trial}"
        d.mkdir(parents=True)
        rows = [{"epoch": e + 1, "noise_mean": v, "noise_mean/body.a": v, "train_loss": 1.0}
                for e, v in enumerate(values)]
        pq.write_table(pa.Table.from_pylist(rows), d / "part-0.parquet")
    curves = noise_curves(pafs.LocalFileSystem(), str(root))
    assert [(c["defense"], c["mean"]) for c in curves] == [("learn2perturb", [0.25, 0.3, 0.4]),
                                                           ("pni", [0.25, 0.1, 0.02])]
    assert curves[1]["layers"] == {"body.a": [0.25, 0.1, 0.02]}
    plot_noise(curves, str(tmp_path / "noise.png"), {})
    assert (tmp_path / "noise.png").stat().st_size > 1000
