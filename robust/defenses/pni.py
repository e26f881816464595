"""`pni`: Parametric Noise Injection on the weights, PNI-W (He, Rakin & Fan, CVPR 2019).

Every convolution and linear layer computes with noisy weights

    w~ = w + a * std(w) * N(0, 1),

drawn afresh at every forward pass, in training and at inference.  std(w) is
the standard deviation of the layer's weight tensor, a constant for the
gradient (PNI computes it without gradient); the learnable scale ``a`` is one
per layer (``granularity="layer"``, PNI's default), per output channel, or per
weight element, initialised at 0.25.  ``a`` is trained jointly with the
weights, by the same loss and the same optimiser step: PGD adversarial
training mixed as alpha * CE(clean) + beta * CE(adv) with alpha = beta = 0.5,
PGD-7, eps 8/255, step 0.01 (the setup Learn2Perturb takes from PNI, its
sections 4.2 and A.4).  There is no regulariser and no alternation; this is
the baseline whose scales Learn2Perturb (Figure 4) shows collapsing towards 0.

Choices: the scales form their own parameter group with weight decay 0 (a
decay on ``a`` would be a regulariser pulling it to 0, which PNI-W does not
have); the weights keep the run's weight decay.  Layers are made noisy by
switching their class to a subclass with the extra parameter ``alpha``, so
every existing parameter key stays as it was.  Noise draws from the loop's
generator while training and from torch's global RNG at inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.attacks.pgd import PGD
from robust.data.base import ImageSplit
from robust.defenses import DEFENSES
from robust.defenses.base import BatchLoss, Defense, TrainStep
from robust.defenses.learn2perturb import (
    NOISE_KEY,
    PAPER_STEP_FRACTION,
    AdversarialMixConfig,
    InjectedNoise,
    eot_pgd_accuracy,
    mixed_adversarial_loss,
    noise_generator,
)
from robust.seeding import derive_seed

GRANULARITIES = ("layer", "channel", "element")


def noisy_weight(layer: nn.Module) -> Tensor:
    """w + alpha * std(w) * N(0, 1), std without gradient (PNI-W)."""
    w = layer.weight
    noise = torch.randn(w.shape, generator=layer.generator, device=w.device, dtype=w.dtype)
    return w + layer.alpha * w.detach().std() * noise


class NoisyConv2d(InjectedNoise, nn.Conv2d):
    """A Conv2d computing with :func:`noisy_weight`; same shapes as Conv2d."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, noisy_weight(self), self.bias)


class NoisyLinear(InjectedNoise, nn.Linear):
    """A Linear computing with :func:`noisy_weight`; same shapes as Linear."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, noisy_weight(self), self.bias)


_NOISY = {nn.Conv2d: NoisyConv2d, nn.Linear: NoisyLinear}


def _scale_shape(weight: Tensor, granularity: str) -> tuple:
    if granularity == "layer":
        return (1,)
    if granularity == "channel":
        return (weight.shape[0],) + (1,) * (weight.dim() - 1)
    return tuple(weight.shape)


def insert_weight_noise(model: nn.Module, granularity: str, scale_init: float) -> List[nn.Module]:
    """Make every Conv2d and Linear of ``model`` noisy (in place); returns the noisy layers."""
    layers = [m for m in model.modules() if type(m) in _NOISY]
    if not layers:
        raise ValueError("pni: the model has no Conv2d or Linear layer to inject weight noise into")
    for layer in layers:
        layer.__class__ = _NOISY[type(layer)]
        layer.alpha = nn.Parameter(torch.full(_scale_shape(layer.weight, granularity), float(scale_init),
                                              device=layer.weight.device))
    return layers


@dataclass
class PNIConfig(AdversarialMixConfig):
    """granularity: one scale per 'layer' (PNI's default), 'channel' or 'element';
    scale_init: initial scale a (0.25, PNI); and the shared settings of
    :class:`AdversarialMixConfig` (alpha, beta, the training PGD, the selection metric)."""

    granularity: str = "layer"
    scale_init: float = 0.25

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown pni granularity {self.granularity!r}; valid choices: "
                             f"{', '.join(GRANULARITIES)}")
        if not self.scale_init >= 0:
            raise ValueError(f"pni scale_init must be >= 0, got {self.scale_init}")
        self.check_mix("pni")


@DEFENSES.register("pni")
class ParametricNoiseInjection(Defense):
    """PNI-W: learnable weight-noise scales trained with the weights under PGD training."""

    name = "pni"

    def __init__(self, eps_data: float = 8 / 255, **config: Any) -> None:
        config.setdefault("eps", eps_data)
        config.setdefault("step_size", config["eps"] * PAPER_STEP_FRACTION)
        super().__init__(PNIConfig(**config))
        self._layers: List[nn.Module] = []
        self._names: List[str] = []
        self._batches = 0

    def prepare_model(self, model: nn.Module) -> nn.Module:
        self._layers = insert_weight_noise(model, self.config.granularity, self.config.scale_init)
        ids = {id(m) for m in self._layers}
        self._names = [path for path, m in model.named_modules() if id(m) in ids]
        return model

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """[weights (the run's weight decay), scales (weight decay 0)], one optimiser step for both."""
        scale_ids = {id(m.alpha) for m in model.modules() if isinstance(m, (NoisyConv2d, NoisyLinear))}
        weights = [p for p in model.parameters() if p.requires_grad and id(p) not in scale_ids]
        scales = [p for p in model.parameters() if id(p) in scale_ids]
        return [{"params": weights}, {"params": scales, "weight_decay": 0.0}]

    def train_passes(self) -> float:
        cfg = self.config
        return float(cfg.alpha > 0) + float(cfg.beta > 0) * (1.0 + cfg.steps)

    def loss(self, step: TrainStep) -> BatchLoss:
        cfg = self.config
        self._batches += 1
        attack = PGD(eps=cfg.eps, step_size=cfg.step_size, steps=int(cfg.steps), random_start=True,
                     seed=derive_seed(step.epoch, self._batches, int(step.index[0])))
        with noise_generator(step.module, step.generator):
            return mixed_adversarial_loss(step, cfg.alpha, cfg.beta, attack)

    def on_epoch_end(self, epoch: int, metrics: Dict[str, float]) -> Dict[str, float]:
        """Mean scale a per layer and over all scales (the quantity of Learn2Perturb's Figure 4)."""
        with torch.no_grad():
            row = {f"{NOISE_KEY}/{name}": float(m.alpha.mean()) for name, m in zip(self._names, self._layers)}
            total = sum(float(m.alpha.sum()) for m in self._layers)
            row[NOISE_KEY] = total / max(sum(m.alpha.numel() for m in self._layers), 1)
        return row

    def state_dict(self) -> Dict[str, Any]:
        return {"batches": self._batches}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._batches = int(state.get("batches", 0))

    def validation_metrics(self, module: nn.Module, split: ImageSplit, device: torch.device,
                           seed: int) -> Dict[str, float]:
        cfg = self.config
        acc = eot_pgd_accuracy(module, split, device, seed, eps=cfg.eps, examples=int(cfg.val_examples),
                               steps=int(cfg.val_eot_steps), eot_samples=int(cfg.val_eot_samples))
        return {"val_eot_pgd_acc": acc}
