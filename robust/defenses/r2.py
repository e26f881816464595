"""`r2`: training for the average margin R2 (Tibo, Jaeger & Larsen, eqs. 7 and 12, section 4.1, Algorithm 1).

The robust loss (eq. 7 with the R2 term of eq. 12):

    L(f) = (1/N) sum_i CE(f(x_i), y_i)  -  lambda (1/N) sum_i eps*(x_i) / CE(f^(x_i), f^(x*_i))

x*_i = g(x_i) comes from an adversarial generator network g trained alongside
f (Algorithm 1), and eps*(x_i) = ||x*_i - x_i||_2.  g minimises (section 4.1)

    1/2 ||g(x) - x||^2 + max(f^(g(x))[c] - f^(g(x))[j], 0),

c = f(x) and j the strongest other class of f^(g(x)).  Every optimiser step of
f on a batch of one shuffle of D is followed (in ``after_step``) by one Adam
step of g on a batch of a second, independent shuffle, as in Algorithm 1.

Choices the paper leaves open, and ours:

* Bounding eq. (12).  CE(p, q) -> H(p) can approach 0 and the ratio is then
  unbounded (the loss goes to -infinity without improving anything).  We use
  eps* / (CE + delta) with delta = ``ce_floor`` = 0.1 nats: the term is at most
  eps*/delta, its gradient at most eps*/delta^2 times that of CE, and for
  CE >> delta it is the paper's ratio.
* eps* and x* are constants for f's step (g is not updated by f's loss), and
  the clean distribution f^(x) is detached in the CE, as the stn defense does:
  the term pulls f(x*) towards f(x), not f(x) towards f(x*).
* j is "the label with the second highest value" when c is still the top
  class; once g(x) is already classified otherwise we take the top class other
  than c, for which the hinge is 0 (only the distance term acts).
* g is a small residual CNN, g(x) = clip(x + h(x), 0, 1), h of three 3x3
  convolutions (width ``generator_width``) whose last layer starts at zero, so
  g starts as the identity.  The paper's g is in an appendix we do not have.
  g lives in the defense (not in the classifier, which evaluation rebuilds
  alone); its weights and Adam state are saved through ``state_dict``.  It is
  initialised from the trial seed; its batches come from a permutation seeded
  by (seed, epoch, rank).  Under DDP its gradients are averaged over ranks.
* The hinge on probabilities saturates once f is confident (d p_c / d z
  = p_c (1 - p_c) -> 0): measured on digits, g then flips few labels
  (4% of validation examples after 150 steps, against 83% with the hinge on
  log-probabilities).  ``generator_margin="logit"`` takes the hinge on
  log f^ instead (same sign, same zero set); the paper's form is the default.
* g's forward passes through f run in eval mode (batch-norm statistics are
  not updated by g's step), like the attacks of the other defenses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from robust.data.base import ImageSplit
from robust.defenses import DEFENSES
from robust.defenses.base import BatchLoss, Defense, TrainStep
from robust.seeding import derive_seed


class AdversarialGenerator(nn.Module):
    """g(x) = clip(x + h(x), 0, 1): (N, C, H, W) in [0,1] -> same shape in [0,1]."""

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()
        self.h = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(self.h[-1].weight)
        nn.init.zeros_(self.h[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x + self.h(x), 0.0, 1.0)


def soft_disagreement(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    """CE(f^(x), f^(x')) = -sum_j f^(x)[j] log f^(x')[j] per row, f^(x) detached; float32."""
    target = F.softmax(clean_logits.detach().float(), dim=-1)
    return -(target * F.log_softmax(other_logits.float(), dim=-1)).sum(-1)


GENERATOR_MARGINS = ("prob", "logit")


def generator_loss(logits_adv: Tensor, x_adv: Tensor, x: Tensor, labels: Tensor, margin: str = "prob") -> Tensor:
    """Section 4.1: mean of 1/2 ||g(x) - x||^2 + max(f^(g(x))[c] - f^(g(x))[j], 0).

    ``margin="prob"`` is the paper's hinge on probabilities; ``"logit"`` takes it on
    log-probabilities (log f^[c] - log f^[j], the logit gap): the same sign and the same
    zero set, but it does not saturate when f is confident."""
    if margin not in GENERATOR_MARGINS:
        raise ValueError(f"unknown generator margin {margin!r}; valid choices: {', '.join(GENERATOR_MARGINS)}")
    p = F.softmax(logits_adv.float(), dim=1) if margin == "prob" else F.log_softmax(logits_adv.float(), dim=1)
    own = p.gather(1, labels[:, None])[:, 0]
    other = p.scatter(1, labels[:, None], float("-inf")).max(1).values
    distance = 0.5 * (x_adv - x).flatten(1).pow(2).sum(1)
    return (distance + torch.relu(own - other)).mean()


@dataclass
class R2TrainConfig:
    """lam: lambda of eq. (7) (>= 0; 0 is plain training); ce_floor: delta bounding eq. (12);
    generator_lr: Adam learning rate of g; generator_width: channels of g's hidden convolutions;
    generator_margin: 'prob' (section 4.1) or 'logit' (the hinge on log-probabilities)."""

    lam: float = 0.1
    ce_floor: float = 0.1
    generator_lr: float = 1e-3
    generator_width: int = 32
    generator_margin: str = "prob"

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ValueError(f"r2 lam (lambda) must be >= 0, got {self.lam}")
        if not self.ce_floor > 0:
            raise ValueError(f"r2 ce_floor must be > 0 (it bounds eq. 12), got {self.ce_floor}")
        if not self.generator_lr > 0:
            raise ValueError(f"r2 generator_lr must be > 0, got {self.generator_lr}")
        if self.generator_margin not in GENERATOR_MARGINS:
            raise ValueError(f"unknown r2 generator_margin {self.generator_margin!r}; valid choices: "
                             f"{', '.join(GENERATOR_MARGINS)}")
        if self.generator_width < 1:
            raise ValueError(f"r2 generator_width must be >= 1, got {self.generator_width}")


def _rank_world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@DEFENSES.register("r2")
class R2Training(Defense):
    """CE minus lambda times the bounded eq. (12) term, with g co-trained (Algorithm 1)."""

    name = "r2"

    def __init__(self, eps_data: float = 8 / 255, **config) -> None:
        # eps_data is accepted for the registry contract: the margin has no budget.
        super().__init__(R2TrainConfig(**config))
        self.generator: Optional[AdversarialGenerator] = None
        self.g_optimizer: Optional[torch.optim.Optimizer] = None
        self._split: Optional[ImageSplit] = None
        self._seed = 0
        self._pending: Dict[str, Any] = {}
        self._order: List[int] = []
        self._batch = 0
        self._stats = [0.0, 0.0, 0.0]  # flipped, distance sum, examples (g's batches this epoch)

    # -- g's lifecycle ---------------------------------------------------------------
    def train_dataset(self, split: ImageSplit, seed: int):
        self._split, self._seed = split, seed
        return split

    def _ready(self, device: torch.device) -> AdversarialGenerator:
        """g and its optimiser on ``device`` (built from the seed, then any saved state)."""
        if self.generator is None:
            if self._split is None:
                raise RuntimeError("r2: train_dataset must run before the first loss (it gives the seed)")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self._seed, 0x67))
                self.generator = AdversarialGenerator(self._split[0][0].shape[0], self.config.generator_width)
        if self.g_optimizer is None or next(self.generator.parameters()).device != device:
            self.generator.to(device)
            self.g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.config.generator_lr)
            if self._pending:
                self.generator.load_state_dict(self._pending["generator"])
                self.g_optimizer.load_state_dict(self._pending["optimizer"])
                self._pending = {}
        return self.generator

    def state_dict(self) -> Dict[str, Any]:
        if self.generator is None:
            return dict(self._pending)
        return {"generator": self.generator.state_dict(), "optimizer": self.g_optimizer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._pending = dict(state) if state else {}
        self.generator, self.g_optimizer = None, None

    def on_epoch_start(self, epoch: int, dataset) -> None:
        super().on_epoch_start(epoch, dataset)
        rank, _ = _rank_world()
        n = len(self._split) if self._split is not None else len(dataset)
        gen = torch.Generator().manual_seed(derive_seed(self._seed, epoch, rank, 0x67))
        self._order = torch.randperm(n, generator=gen).tolist()  # Algorithm 1's second shuffle
        self._stats = [0.0, 0.0, 0.0]

    def on_epoch_end(self, epoch: int, metrics: Dict[str, float]) -> Optional[Dict[str, float]]:
        flipped, distance, n = self._stats
        return {"generator_flip_rate": flipped / max(n, 1), "generator_distance": distance / max(n, 1)}

    # -- f's step (eq. 7 with the bounded eq. 12) -------------------------------------------------
    def loss(self, step: TrainStep) -> BatchLoss:
        g = self._ready(step.x.device)
        self._batch = step.x.shape[0]
        logits = step.model(step.x)
        loss = F.cross_entropy(logits, step.y)
        if self.config.lam > 0:
            with torch.no_grad():
                x_star = g(step.x)
            eps_star = (x_star - step.x).flatten(1).norm(dim=1).float()
            ratio = eps_star / (soft_disagreement(logits, step.model(x_star)) + self.config.ce_floor)
            loss = loss - self.config.lam * ratio.mean()
        return BatchLoss(loss, logits)

    # -- g's step (section 4.1), after every step of f ------------------------------------------
    def after_step(self, module: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self._split is None or not self._order:
            return
        device = next(module.parameters()).device
        g = self._ready(device)
        take, self._order = self._order[:self._batch], self._order[self._batch:]
        z = self._split.batch(take)[0].to(device)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                labels = module(z).argmax(1)
            z_adv = g(z)
            logits = module(z_adv)
            loss = generator_loss(logits, z_adv, z, labels, self.config.generator_margin)
            grads = torch.autograd.grad(loss, list(g.parameters()))
        finally:
            module.train(was_training)
        _, world = _rank_world()
        for p, grad in zip(g.parameters(), grads):
            if world > 1:
                dist.all_reduce(grad)
                grad /= world
            p.grad = grad
        self.g_optimizer.step()
        with torch.no_grad():
            self._stats[0] += float((logits.argmax(1) != labels).sum())
            self._stats[1] += float((z_adv - z).flatten(1).norm(dim=1).sum())
            self._stats[2] += z.shape[0]
