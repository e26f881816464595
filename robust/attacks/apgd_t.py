"""APGD-T: Auto-PGD on the targeted DLR loss (Croce & Hein, ICML 2020, section 4 and eq. 5).

For each of the ``targets`` classes ranked 2nd, 3rd, ... by the logits at the
clean input, one run of APGD (Algorithm 1, :class:`robust.attacks.apgd.APGD`)
maximises the targeted DLR loss

    DLR-T(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12),       (eq. 5)

pi sorting z in decreasing order, on the examples that no earlier target has
broken.  AutoAttack's standard version uses 9 target classes, 100 iterations
and one restart per target: those are the defaults.  An example counts as
broken when it is misclassified (into any class), as in AutoAttack.

Choices: the ranking of the targets uses the logits averaged over
``eot_samples`` passes; with fewer than ``targets + 1`` classes every other
class is a target.  On a stochastic model (see :class:`APGD`) every example
gets every target and restart, and keeps the point with the lowest fraction of
EOT draws classified correctly (ties: the higher targeted DLR loss).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS
from robust.attacks.apgd import APGD, _per_example
from robust.attacks.verdict import better


def targeted_dlr_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR (Croce & Hein 2020, eq. 5) per example (N,); needs K >= 4 classes.

    Shapes: logits (N, K), y (N,), target (N,) -> (N,).
    """
    if logits.dim() != 2 or logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs logits (N, K) with K >= 4 classes, "
                         f"got {tuple(logits.shape)}")
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


class APGDTargeted(APGD):
    """APGD on the targeted DLR loss, one run per target class (AutoAttack's APGD-T).

    Args:
        eps, norm, steps, rho, alpha, seed, eot_samples, eot_chunk: as APGD;
        targets: the number of target classes (9, AutoAttack);
        restarts: runs per target class (1, AutoAttack).
    Shapes: x (N,C,H,W) in [0,1], y (N,) -> x_adv like x, inside the eps-ball of ``norm``.
    Example: ``APGDTargeted(eps=8/255)(model, x, y)``.
    """

    name = "apgd-t"

    def __init__(self, eps: float, targets: int = 9, norm: str = "linf", steps: int = 100, restarts: int = 1,
                 rho: float = 0.75, alpha: float = 0.75, seed: int = 0, eot_samples: int = 1,
                 eot_chunk: Optional[int] = None) -> None:
        super().__init__(eps=eps, norm=norm, loss="dlr", steps=steps, restarts=restarts, rho=rho,
                         alpha=alpha, seed=seed, eot_samples=eot_samples, eot_chunk=eot_chunk)
        if targets < 1:
            raise ValueError(f"targets must be >= 1, got {targets}")
        self.targets = targets
        self.loss_fn = self._targeted_loss
        self._target: Optional[Tensor] = None  # the target class of each example of the current run

    def _targeted_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """DLR-T against the current run's targets (repeated for the stacked EOT copies)."""
        target = self._target.repeat(logits.shape[0] // self._target.shape[0])
        return targeted_dlr_loss(logits, y, target)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        with torch.no_grad():
            logits = sum(model(x).float() for _ in range(self.eot_samples)) / self.eot_samples
        if logits.shape[1] < 4:
            raise ValueError(f"APGD-T needs at least 4 classes, got {logits.shape[1]}")
        ranking = logits.argsort(dim=1, descending=True)
        self._stochastic = self.is_stochastic(model, x)
        if self._stochastic:
            return self._all_targets(model, x, y, ranking, generator)
        x_adv = x.clone()
        fooled = logits.argmax(1) != y
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        for rank in range(1, min(self.targets, logits.shape[1] - 1) + 1):
            for _ in range(self.restarts):
                todo = (~fooled).nonzero().squeeze(1)
                if todo.numel() == 0:
                    return x_adv
                self._target = ranking[todo, rank]
                try:
                    x_run, loss_run, fooled_run = self._run(model, x[todo], y[todo], generator)
                finally:
                    self._target = None
                take = fooled_run | (loss_run > best_loss[todo])
                x_adv[todo[take]] = x_run[take]
                best_loss[todo] = torch.maximum(best_loss[todo], loss_run)
                fooled[todo] = fooled_run
        return x_adv

    def _all_targets(self, model: nn.Module, x: Tensor, y: Tensor, ranking: Tensor,
                     generator: torch.Generator) -> Tensor:
        """Stochastic models: every target and restart on every example, the best point kept."""
        x_adv, score = x.clone(), torch.full((x.shape[0],), float("inf"), device=x.device)
        loss = torch.full_like(score, float("-inf"))
        for rank in range(1, min(self.targets, ranking.shape[1] - 1) + 1):
            for _ in range(self.restarts):
                self._target = ranking[:, rank]
                try:
                    run = self._full_run(model, x, y, generator)
                finally:
                    self._target = None
                take = better(run.best_score, run.best_loss, score, loss)
                x_adv = torch.where(_per_example(take, x), run.x_best, x_adv)
                score = torch.where(take, run.best_score, score)
                loss = torch.where(take, run.best_loss, loss)
        return x_adv


@ATTACKS.register("apgd-t")
def _apgd_t(eps: float, **kwargs) -> APGDTargeted:
    return APGDTargeted(eps=eps, **kwargs)
