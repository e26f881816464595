"""`trades`: TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, ICML 2019).

"Theoretically Principled Trade-off between Robustness and Accuracy": the
multi-class surrogate of their robust risk bound,

    min_theta  E[ CE(f(x), y) + beta * max_{||x' - x||_inf <= eps} KL(f(x) || f(x')) ],

f(.) the softmax output and beta = 1/lambda the trade-off.  The inner maximum
is approximated by PGD on the KL (their Algorithm 2): start at
x + 0.001 * N(0, I) (clipped to [0, 1]), then ``steps`` signed-gradient steps
of ``step_size``, each projected onto the eps-ball and [0, 1].

Implementation choices:

* The inner maximisation runs on the unwrapped model in eval mode (through
  :class:`robust.attacks.base.Attack`, which restores the mode), and its target
  f(x) is computed there without gradient; it uses ``torch.autograd.grad``, so
  no parameter gradient is accumulated.  The outer loss runs in train mode and
  back-propagates through both f(x) and f(x') (the target is not detached),
  as the objective above is written.
* The KL is summed over classes and averaged over the batch
  (KL(f(x) || f(x')) / batch).
* Paper defaults on CIFAR-10: eps = 0.031, step 0.007, 10 steps, beta = 6
  (1/lambda = 6, the setting of their CIFAR-10 results).  Here eps defaults to
  the dataset's eps_data (8/255 = 0.0314 on CIFAR-10) and the step to
  eps * 0.007 / 0.031 (their step as a fraction of eps: 0.00708 at 8/255).
* The random start is drawn from ``TrainStep.generator`` (reproducible from the seed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.attacks.base import Attack, LinfBall
from robust.defenses import DEFENSES
from robust.defenses.base import BatchLoss, Defense, TrainStep

#: TRADES' CIFAR-10 step size relative to its budget: 0.007 / 0.031.
STEP_FRACTION = 0.007 / 0.031
#: Standard deviation of the random start around x (Zhang et al., Algorithm 2).
START_STD = 0.001


def kl_divergence(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """Per-example KL(f(x) || f(x')) = sum_j p_j (log p_j - log q_j), shape (N,), float32.

    Computed from log-probabilities, so it is finite and >= 0 even where a
    probability underflows to zero.
    """
    log_p = F.log_softmax(clean_logits.float(), dim=1)
    log_q = F.log_softmax(adv_logits.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


class TradesAdversary(Attack):
    """x' = argmax_{x' in B_inf(x, eps) and [0,1]^d} KL(f(x) || f(x')) by PGD (Algorithm 2).

    Args: eps: L-inf radius; step_size; steps; generator: draws the start
    x + 0.001 * N(0, I) (on the device of x; None uses torch's global RNG).
    Shapes: x (N,C,H,W) in [0,1] -> x' like x; the labels are not used.
    """

    name = "trades-kl"

    def __init__(self, eps: float, step_size: float, steps: int,
                 generator: Optional[torch.Generator] = None) -> None:
        self.ball = LinfBall(eps)
        self.step_size = step_size
        self.steps = steps
        self.generator = generator

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            clean_logits = model(x)
        start = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        x_adv = self.ball.project(x + START_STD * start, x)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            kl = kl_divergence(clean_logits, model(x_adv)).sum()  # summed: per-example gradients
            grad, = torch.autograd.grad(kl, x_adv)
            x_adv = self.ball.project(self.ball.step(x_adv.detach(), grad, self.step_size), x)
        return x_adv


@dataclass
class TradesConfig:
    """beta: weight of the robustness regulariser (1/lambda; 6 on CIFAR-10);
    eps: L-inf budget of the inner maximum (eps_data unless given; 0.031 in the paper);
    step_size: PGD step (eps * 0.007/0.031 unless given); steps: 10."""

    beta: float = 6.0
    eps: float = 0.031
    step_size: float = 0.007
    steps: int = 10

    def __post_init__(self) -> None:
        if not self.beta >= 0:
            raise ValueError(f"trades beta must be >= 0, got {self.beta}")
        if not (self.eps > 0 and self.step_size > 0):
            raise ValueError(f"trades eps and step_size must be > 0, got {self.eps}, {self.step_size}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"trades steps must be an integer >= 1, got {self.steps}")


@DEFENSES.register("trades")
class Trades(Defense):
    """CE on the clean batch plus beta times the KL to its worst-case neighbour."""

    name = "trades"

    def __init__(self, eps_data: float = 8 / 255, **config) -> None:
        config.setdefault("eps", eps_data)
        config.setdefault("step_size", config["eps"] * STEP_FRACTION)
        super().__init__(TradesConfig(**config))

    def adversary(self, generator: Optional[torch.Generator]) -> TradesAdversary:
        cfg = self.config
        return TradesAdversary(cfg.eps, cfg.step_size, int(cfg.steps), generator)

    def train_passes(self) -> float:
        return 2.0 + self.config.steps  # the KL ascent steps, then the clean and adversarial passes

    def loss(self, step: TrainStep) -> BatchLoss:
        x_adv = self.adversary(step.generator)(step.module, step.x, step.y)
        logits = step.model(step.x)
        robust = kl_divergence(logits, step.model(x_adv)).mean()
        loss = F.cross_entropy(logits, step.y) + self.config.beta * robust
        return BatchLoss(loss, logits)
