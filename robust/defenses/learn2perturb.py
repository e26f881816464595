"""`learn2perturb` and `learn2perturb-r`: learned feature-noise injection (Jeddi et al., CVPR 2020).

Perturbation-injection modules (equations 4 and 5) turn a layer's output h into

    h + theta * N(0, 1),        one theta per element of the feature map (section 3.1),

drawn independently per example and element, in training and at inference
(section 3.3).  Where they go (A.1): at the output of every residual block,
before the block's final ReLU in post-activation blocks (ResNet-V1,
``resnet20`` ... and ``resnet18``) and at the block's output, the residual
sum, in pre-activation blocks (``preact-resnet18``, Wide-ResNets).  Blocks
expose the residual sum as an identity module ``sum_hook`` that is replaced
here.  Models without residual blocks (``lenet``, ``mlp3``, ``cnn7``,
``small-cnn``) get a module after every hidden activation, the general
placement A.1 names ("after the activation of each layer").

Training is Algorithm 1 with PGD adversarial training (A.4, equation 11):

    loss = alpha * CE(f(x)) + beta * CE(f(x_adv)) + gamma * g(theta),
    g(theta) = -sum_j sqrt(theta_j) / tau(t)                           (equations 7, 8)

Both gradients come from ONE forward and backward pass at (W^(t-1), theta^(t-1)),
then two updates are applied: W with its group (the run's weight decay) and
theta with its own group (weight decay 0, A.4).  The two groups of one optimiser
step are exactly Algorithm 1's two updates: each reads only its own gradient and
optimiser state, and neither gradient is recomputed after the other update.
After every step values of theta below theta_min are projected to theta_min
(``after_step``).  ``learn2perturb-r`` (section 4.3) updates theta by the
regulariser only: the classification loss sees theta as a constant.

Choices where the paper is silent or ambiguous (all documented in the report):

* tau (equation 9 as printed, sum_i 1/(i - s - 1), divides by zero): the
  harmonic number H_(t - s) = sum_{i=1}^{t-s} 1/i for epochs t > s, where s is
  the last epoch without noise (s = ``warmup_epochs``): tau(s+1) = 1, tau(s+2) = 1.5.
* g sums over every theta element of every layer (equation 7 applies g to the
  set theta), so each element's regulariser gradient, -gamma / (2 tau sqrt(theta)),
  does not depend on the size of its layer.
* The regulariser enters the loss as ``reg - reg.detach()``: its gradient is
  exact and the logged ``train_loss`` stays the classification loss of
  equation 11 (the regulariser's value is a constant for W).
* theta_0 = 0.25 and theta_min = 0.01 (Algorithm 1 names both, gives no value).
* Warm-up: ``warmup_epochs`` = 0 by default (every registry contract runs one
  epoch); the paper's 20 epochs (section 3.3) are the `paper` preset's.  During
  warm-up no noise is drawn and theta is not updated; PGD training (equation 11)
  runs from the first epoch.
* PGD step: 0.01 at eps = 8/255 (section 4.2), i.e. 0.31875 * eps for other budgets.
* Noise draws from the generator the loop hands to the loss while training (and
  while the training PGD runs), so training is reproducible from the seed; at
  inference from torch's global RNG, which the evaluation protocol seeds.  On the
  CPU the values come from ``robust.native.noise`` (Philox, keyed by one draw from
  that generator), elsewhere from ``torch.randn``: both N(0, 1), different streams.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.attacks.pgd import PGD
from robust.data.base import ImageSplit
from robust.defenses import DEFENSES
from robust.defenses.base import BatchLoss, Defense, TrainStep
from robust.native.noise import add_feature_noise
from robust.seeding import derive_seed

#: PGD step of the paper's adversarial training relative to eps: 0.01 at 8/255 (section 4.2).
PAPER_STEP_FRACTION = 0.01 / (8 / 255)
#: Prefix of the per-layer mean noise scale in the epoch rows (Figure 4).
NOISE_KEY = "noise_mean"


class InjectedNoise:
    """Mixin of every module that draws noise: ``generator`` (None: torch's global RNG)
    is set by the defense while it trains, so training noise follows the loop's seed."""

    generator: Optional[torch.Generator] = None


class FeatureNoise(InjectedNoise, nn.Module):
    """h + theta * N(0, 1) (equations 4 and 5), theta one scale per feature element.

    Args: shape: the feature shape without the batch dimension, (C, H, W) or (F,);
        theta_init: theta_0; learn_from_loss: False detaches theta in the forward
        pass (Learn2Perturb-R: the classification loss does not update theta).
    Shape: (N, *shape) -> (N, *shape).  ``enabled`` False passes h through (warm-up).
    In eval mode theta is detached too: noise is still drawn, but no pass outside
    training carries a gradient to theta.
    """

    def __init__(self, shape: Sequence[int], theta_init: float, learn_from_loss: bool = True) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.full(tuple(shape), float(theta_init)))
        self.learn_from_loss = learn_from_loss
        self.enabled = True

    def forward(self, h: Tensor) -> Tensor:
        if not self.enabled:
            return h
        theta = self.theta if (self.learn_from_loss and self.training) else self.theta.detach()
        return add_feature_noise(h, theta, self.generator)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.theta.shape)}, learn_from_loss={self.learn_from_loss}"


# --- where the modules go -------------------------------------------------------------------

def _injection_points(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """(path, parent, attribute) of every injection point: the ``sum_hook`` of each
    residual block, or else every hidden activation module (A.1)."""
    hooks = [(f"{path}.sum_hook" if path else "sum_hook", m, "sum_hook")
             for path, m in model.named_modules() if isinstance(getattr(m, "sum_hook", None), nn.Identity)]
    if hooks:
        return hooks
    return [(f"{path}.{name}" if path else name, parent, name)
            for path, parent in model.named_modules() for name, child in parent.named_children()
            if isinstance(child, (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh))]


def _feature_shapes(model: nn.Module, points: List[Tuple[str, nn.Module, str]]) -> List[Tuple[int, ...]]:
    """The output shape (without batch) at each injection point, from one probe forward pass."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("learn2perturb needs a model built by robust.models.create_model "
                         "(it sizes theta by the feature maps of the model's input_shape)")
    shapes: Dict[int, Tuple[int, ...]] = {}
    handles = [getattr(parent, attr).register_forward_hook(
        lambda _m, _i, out, k=k: shapes.__setitem__(k, tuple(out.shape[1:])))
        for k, (_, parent, attr) in enumerate(points)]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [shapes[k] for k in range(len(points))]


def insert_feature_noise(model: nn.Module, theta_init: float, learn_from_loss: bool) -> List[FeatureNoise]:
    """Insert a :class:`FeatureNoise` at every injection point of ``model`` (in place).

    A ``sum_hook`` identity is replaced by the noise module; an activation module
    becomes ``Sequential(activation, noise)`` (no parameter key of the model
    changes).  Raises ValueError when the model has no injection point.
    """
    if any(isinstance(m, FeatureNoise) for m in model.modules()):
        raise ValueError("the model already carries feature noise (prepare_model was applied twice)")
    points = _injection_points(model)
    if not points:
        raise ValueError("model has no residual block sum_hook and no activation module: "
                         "nowhere to inject feature noise")
    modules = []
    for (_, parent, attr), shape in zip(points, _feature_shapes(model, points)):
        noise = FeatureNoise(shape, theta_init, learn_from_loss).to(next(model.parameters()).device)
        old = getattr(parent, attr)
        setattr(parent, attr, noise if isinstance(old, nn.Identity) else nn.Sequential(old, noise))
        modules.append(noise)
    return modules


# --- pieces the noise-injection defenses share (pni.py uses them too) ------------------------

@contextmanager
def noise_generator(module: nn.Module, generator: Optional[torch.Generator]) -> Iterator[None]:
    """Every :class:`InjectedNoise` of ``module`` draws from ``generator`` inside the block."""
    sources = [m for m in module.modules() if isinstance(m, InjectedNoise)]
    for m in sources:
        m.generator = generator
    try:
        yield
    finally:
        for m in sources:
            m.generator = None


def mixed_adversarial_loss(step: TrainStep, alpha: float, beta: float, attack: Optional[PGD]) -> BatchLoss:
    """alpha * CE(f(x), y) + beta * CE(f(x_adv), y) (A.4, equation 11), two passes in train mode.

    x_adv comes from ``attack`` on the unwrapped module (eval mode: the attack's
    passes do not update batch-norm statistics).  Training accuracy counts the
    clean logits (the adversarial ones when alpha = 0).
    """
    terms, logits = [], None
    if beta > 0 and attack is not None:
        x_adv = attack(step.module, step.x, step.y)
        adv_logits = step.model(x_adv)
        terms.append(beta * F.cross_entropy(adv_logits, step.y))
        logits = adv_logits
    if alpha > 0:
        logits = step.model(step.x)
        terms.insert(0, alpha * F.cross_entropy(logits, step.y))
    return BatchLoss(sum(terms[1:], terms[0]), logits)


def eot_pgd_accuracy(module: nn.Module, split: ImageSplit, device: torch.device, seed: int, *,
                     eps: float, examples: int, steps: int, eot_samples: int, batch_size: int = 128) -> float:
    """Accuracy under EOT-PGD (L-inf, step eps/4, gradient averaged over ``eot_samples``
    noisy passes) on the first ``examples`` examples of ``split``; noise seeded by ``seed``."""
    from robust.train.loop import evaluate_accuracy  # the loop imports the defenses

    subset = split.subset(torch.arange(min(examples, len(split))))
    attack = PGD(eps=eps, step_size=eps / 4, steps=steps, eot_samples=eot_samples, seed=seed)
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, 0x4E01))
    with noise_generator(module, generator):
        return evaluate_accuracy(module, subset, device, batch_size, attack)


def harmonic_tau(epoch: int, warmup_epochs: int) -> float:
    """tau(t) = sum_{i=1}^{t-s} 1/i for t > s (equation 9, harmonic reading; s = warm-up)."""
    if epoch <= warmup_epochs:
        raise ValueError(f"tau is defined for epochs after the warm-up (> {warmup_epochs}), got {epoch}")
    return sum(1.0 / i for i in range(1, epoch - warmup_epochs + 1))


@dataclass
class AdversarialMixConfig:
    """What the noise-injection defenses share: alpha, beta: clean and adversarial loss
    weights (0.5 each, equation 11); eps, step_size, steps: the training PGD (8/255,
    0.01, 7; section 4.2); val_examples, val_eot_steps, val_eot_samples: the selection
    metric ``val_eot_pgd_acc`` (EOT-PGD on the validation split; the paper evaluates
    with 80 samples per step, section 4.5; a small budget ranks trials)."""

    alpha: float = 0.5
    beta: float = 0.5
    eps: float = 8 / 255
    step_size: float = 0.01
    steps: int = 7
    val_examples: int = 200
    val_eot_steps: int = 10
    val_eot_samples: int = 8

    def check_mix(self, name: str) -> None:
        if not (self.alpha >= 0 and self.beta >= 0 and self.alpha + self.beta > 0):
            raise ValueError(f"{name} alpha and beta must be >= 0 and not both 0, got {self.alpha}, {self.beta}")
        if not (self.eps > 0 and self.step_size > 0):
            raise ValueError(f"{name} eps and step_size must be > 0, got {self.eps}, {self.step_size}")
        for key in ("steps", "val_examples", "val_eot_steps", "val_eot_samples"):
            value = getattr(self, key)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} {key} must be an integer >= 1, got {value}")


@dataclass
class Learn2PerturbConfig(AdversarialMixConfig):
    """gamma: regulariser weight (equation 7; 1e-4, A.4); theta_init: theta_0;
    theta_min: lower bound of theta (Algorithm 1); warmup_epochs: epochs without
    noise before the alternating updates start (20 in the paper, section 3.3);
    and the shared settings of :class:`AdversarialMixConfig`."""

    gamma: float = 1e-4
    # theta_0: 0.25 in the authors' public code, for ResNets whose batch norms keep
    # features at unit scale (the `paper` preset sets it).  The generic default is
    # smaller because networks without batch norm have smaller features: small-cnn
    # trained one epoch on `synthetic` reaches 65% training accuracy at 0.05 and 13%
    # (chance) at 0.25.
    theta_init: float = 0.05
    theta_min: float = 0.01
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        name = "learn2perturb"
        if not self.gamma >= 0:
            raise ValueError(f"{name} gamma must be >= 0, got {self.gamma}")
        if not self.theta_min >= 0:
            raise ValueError(f"{name} theta_min must be >= 0, got {self.theta_min}")
        if not self.theta_init >= self.theta_min:
            raise ValueError(f"{name} theta_init must be >= theta_min ({self.theta_min}), got {self.theta_init}")
        if isinstance(self.warmup_epochs, bool) or int(self.warmup_epochs) != self.warmup_epochs \
                or self.warmup_epochs < 0:
            raise ValueError(f"{name} warmup_epochs must be an integer >= 0, got {self.warmup_epochs}")
        self.check_mix(name)


@DEFENSES.register("learn2perturb")
class Learn2Perturb(Defense):
    """Feature noise with learned scales, alternating W/theta updates, PGD training."""

    name = "learn2perturb"
    #: False for Learn2Perturb-R: theta learns from the regulariser only.
    theta_from_loss = True

    def __init__(self, eps_data: float = 8 / 255, **config: Any) -> None:
        config.setdefault("eps", eps_data)
        config.setdefault("step_size", config["eps"] * PAPER_STEP_FRACTION)
        super().__init__(Learn2PerturbConfig(**config))
        self._noise: List[FeatureNoise] = []
        self._names: List[str] = []
        self._epoch = 0      # the epoch in progress (0 before training)
        self._batches = 0    # training batches so far: seeds the PGD random starts

    # -- model and parameters --------------------------------------------------------------

    def prepare_model(self, model: nn.Module) -> nn.Module:
        self._noise = insert_feature_noise(model, self.config.theta_init, self.theta_from_loss)
        ids = {id(m) for m in self._noise}
        self._names = [path for path, m in model.named_modules() if id(m) in ids]
        return model

    def thetas(self) -> List[nn.Parameter]:
        return [m.theta for m in self._noise]

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """[W (the run's weight decay), theta (weight decay 0, A.4)]: Algorithm 1's two updates."""
        theta_ids = {id(m.theta) for m in model.modules() if isinstance(m, FeatureNoise)}
        weights = [p for p in model.parameters() if p.requires_grad and id(p) not in theta_ids]
        thetas = [p for p in model.parameters() if id(p) in theta_ids]
        return [{"params": weights}, {"params": thetas, "weight_decay": 0.0}]

    def check_train_config(self, train: Any) -> None:
        if self.config.warmup_epochs >= train.epochs:
            raise ValueError(f"{self.name} warmup_epochs ({self.config.warmup_epochs}) must be shorter than "
                             f"the run ({train.epochs} epochs): no epoch would train the noise")

    def train_passes(self) -> float:
        cfg = self.config
        return float(cfg.alpha > 0) + float(cfg.beta > 0) * (1.0 + cfg.steps)

    # -- one step ---------------------------------------------------------------------------

    @property
    def noise_active(self) -> bool:
        return self._epoch > self.config.warmup_epochs

    def regularizer(self, epoch: Optional[int] = None) -> Tensor:
        """gamma * g(theta) = -gamma * sum_j sqrt(theta_j) / tau(epoch) (equations 7-9), a scalar."""
        tau = harmonic_tau(self._epoch if epoch is None else epoch, self.config.warmup_epochs)
        # sqrt's gradient is infinite at 0: a theta at a theta_min of 0 gets no push.
        total = sum(torch.sqrt(t.clamp_min(1e-12)).sum() for t in self.thetas())
        return -self.config.gamma * total / tau

    def loss(self, step: TrainStep) -> BatchLoss:
        cfg = self.config
        self._batches += 1
        active = step.epoch > cfg.warmup_epochs
        for m in self._noise:
            m.enabled = active
        attack = PGD(eps=cfg.eps, step_size=cfg.step_size, steps=int(cfg.steps), random_start=True,
                     seed=derive_seed(step.epoch, self._batches, int(step.index[0])))
        with noise_generator(step.module, step.generator):
            out = mixed_adversarial_loss(step, cfg.alpha, cfg.beta, attack)
        if active and cfg.gamma > 0:
            reg = self.regularizer(step.epoch)
            # Zero in value, exact in gradient: train_loss stays the classification loss.
            out = BatchLoss(out.loss + (reg - reg.detach()), out.logits)
        return out

    def after_step(self, module: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Project theta onto [theta_min, inf) (Algorithm 1, last line)."""
        with torch.no_grad():
            for theta in self.thetas():
                theta.clamp_(min=self.config.theta_min)

    # -- epochs, state, selection -----------------------------------------------------------

    def on_epoch_start(self, epoch: int, dataset: Any) -> None:
        super().on_epoch_start(epoch, dataset)
        self._epoch = epoch
        for m in self._noise:
            m.enabled = self.noise_active

    def on_epoch_end(self, epoch: int, metrics: Dict[str, float]) -> Dict[str, float]:
        """Mean theta per layer (Figure 4), over all elements, and the epoch's tau."""
        with torch.no_grad():
            row = {f"{NOISE_KEY}/{name}": float(m.theta.mean()) for name, m in zip(self._names, self._noise)}
            total = sum(float(m.theta.sum()) for m in self._noise)
            row[NOISE_KEY] = total / max(sum(m.theta.numel() for m in self._noise), 1)
        row["noise_tau"] = harmonic_tau(epoch, self.config.warmup_epochs) if self.noise_active else 0.0
        return row

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._epoch = int(state.get("epoch", 0))
        self._batches = int(state.get("batches", 0))

    def validation_metrics(self, module: nn.Module, split: ImageSplit, device: torch.device,
                           seed: int) -> Dict[str, float]:
        cfg = self.config
        acc = eot_pgd_accuracy(module, split, device, seed, eps=cfg.eps, examples=int(cfg.val_examples),
                               steps=int(cfg.val_eot_steps), eot_samples=int(cfg.val_eot_samples))
        return {"val_eot_pgd_acc": acc}


@DEFENSES.register("learn2perturb-r")
class Learn2PerturbR(Learn2Perturb):
    """Learn2Perturb-R (section 4.3): theta is updated by the regulariser g only."""

    name = "learn2perturb-r"
    theta_from_loss = False
