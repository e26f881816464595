"""Auto-PGD (Croce & Hein, ICML 2020), Algorithm 1: PGD with momentum and a self-tuning step.

"Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks".  The step size starts at 2 eps and is halved, per
example, at checkpoints where progress stalled; each halving restarts that
example from the best point seen so far.  L-inf and L2, cross-entropy or DLR
loss (eq. 4), with EOT through :class:`GradientAttack`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS
from robust.attacks.base import GradientAttack, cross_entropy, threat_model
from robust.attacks.verdict import better


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 4), one value per example.

    DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), pi sorting z in
    decreasing order.  Shifting the logits leaves it unchanged and so (up to the
    1e-12) does scaling them by a positive factor, so ascent cannot gain by merely
    inflating the logits.  It needs at least 3 classes.
    Shapes: logits (N, K) with K >= 3, y (N,) -> (N,).
    """
    if logits.dim() != 2 or logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs logits (N, K) with K >= 3 classes, got {tuple(logits.shape)}")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    best_other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    top3 = logits.topk(3, dim=1).values
    return -(z_y - best_other) / (top3[:, 0] - top3[:, 2] + 1e-12)


LOSSES = {"ce": cross_entropy, "dlr": dlr_loss}


def checkpoints(n_iter: int) -> List[int]:
    """The iterations W = {w_0, w_1, ...} at which APGD may halve its step (section 3.1).

    w_j = ceil(p_j * n_iter) with p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), for every p_j <= 1: long
    exploration first, then ever finer control of the step.  On short runs ceil
    can repeat a value; repeats are dropped, so the list is strictly increasing.
    """
    p_prev, p, fractions = 0.0, 0.22, [0.0]
    while p <= 1.0 + 1e-9:
        fractions.append(p)
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    # Round before ceil: in floating point 0.22 * 100 is 22.000000000000004.
    return sorted({math.ceil(round(f * n_iter, 6)) for f in fractions})


def _per_example(mask: Tensor, like: Tensor) -> Tensor:
    """A (N,) mask or vector shaped (N, 1, 1, ...) to broadcast against ``like``."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class _Run:
    """The per-example state of one run of Algorithm 1 (all tensors have N rows)."""

    x: Tensor              # x^(k), the current iterate
    x_prev: Tensor         # x^(k-1), for the momentum term
    loss: Tensor           # f(x^(k)), EOT mean
    grad: Tensor           # EOT gradient at x^(k)
    eta: Tensor            # step size, shaped (N, 1, ...)
    x_max: Tensor          # the iterate of highest loss so far ...
    f_max: Tensor          # ... its loss ...
    g_max: Tensor          # ... and its gradient (reused when restarting from x_max)
    x_fooled: Tensor       # the first misclassified iterate (valid where ``fooled``)
    fooled: Tensor         # bool
    x_best: Tensor         # stochastic models: the iterate the verdict most likely counts as broken ...
    best_score: Tensor     # ... its fraction of EOT draws classified correctly ...
    best_loss: Tensor      # ... and its EOT loss (the tie-break)
    increases: Tensor      # steps since the last checkpoint where the loss went up
    reduced_last: Tensor   # bool: eta was halved at the last checkpoint
    f_max_last: Tensor     # f_max at the last checkpoint


class APGD(GradientAttack):
    """Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1) in the eps-ball of ``norm``.

    From a uniform random start x0, x1 = P(x0 + eta step(grad)); then
    z = P(x_k + eta step(grad_k)) and
    x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1})), with
    ``step`` the steepest-ascent direction of the norm (sign for L-inf,
    normalised gradient for L2) and eta = 2 eps at first (for both norms).  At
    each checkpoint of :func:`checkpoints`, an example whose loss rose in fewer
    than rho of the steps since the last checkpoint (condition 1), or whose
    step was not halved last time and whose best loss has not improved since
    (condition 2), halves eta and restarts from its best point, with its
    momentum reset.  An example counts as broken at its first misclassified
    iterate, which is kept; otherwise the attack returns the iterate of highest
    loss.  Restarts run only on examples not yet broken.

    On a stochastic model (forward passes differ) "misclassified" at one iterate
    is a statement about one set of draws, and the evaluation's verdict takes
    fresh ones (:mod:`robust.attacks.verdict`).  There the attack never freezes
    an iterate and never stops early: every example runs every step of every
    restart, and the attack returns, per example, the iterate with the lowest
    fraction of its EOT draws classified correctly, ties going to the higher EOT
    loss (so where no draw is fooled it is Algorithm 1's x_max).

    Choices where the paper leaves room (all per example):
      * the loss used for bookkeeping is the EOT mean over ``eot_samples``
        passes, and "misclassified" means the argmax of the EOT-mean logits;
      * condition 1 counts the w_j - w_{j-1} most recent steps (the plain first
        step x0 -> x1 is not counted), i.e. the paper's window shifted by one so
        that it ends at the newest iterate;
      * at the first checkpoint, condition 2 compares f_max with f(x0);
      * after a restart from x_max, the stored EOT gradient at x_max is reused
        (no extra evaluation) and f(x_k) := f_max for the next increase test;
      * ``steps`` counts update steps: the run evaluates steps + 1 points.

    Args:
        eps: budget; norm: 'linf' or 'l2'; loss: 'ce' (cross-entropy) or 'dlr' (eq. 4);
        steps: N_iter (100 in the paper); restarts: random restarts;
        rho: condition-1 threshold (0.75); alpha: momentum weight (0.75);
        seed: seeds the random starts; eot_samples, eot_chunk: see GradientAttack.
    Shapes: x (N,C,H,W) in [0,1], y (N,) -> x_adv like x.
    Example: ``APGD(eps=8/255, loss="dlr", steps=100)(model, x, y)``.
    """

    name = "apgd"

    def __init__(self, eps: float, norm: str = "linf", loss: str = "ce", steps: int = 100,
                 restarts: int = 1, rho: float = 0.75, alpha: float = 0.75, seed: int = 0,
                 eot_samples: int = 1, eot_chunk: Optional[int] = None) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown APGD loss {loss!r}; valid choices: {', '.join(LOSSES)}")
        super().__init__(eot_samples=eot_samples, eot_chunk=eot_chunk, loss_fn=LOSSES[loss])
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
        if not (0.0 <= rho <= 1.0 and 0.0 < alpha <= 1.0):
            raise ValueError(f"need 0 <= rho <= 1 and 0 < alpha <= 1, got rho={rho}, alpha={alpha}")
        self.ball = threat_model(norm, eps)
        self.norm, self.loss, self.steps, self.restarts = norm, loss, steps, restarts
        self.rho, self.alpha, self.seed = rho, alpha, seed
        w = checkpoints(steps)
        # Checkpoint iteration -> length of the window since the previous one.
        self.windows: Dict[int, int] = {w[j]: w[j] - w[j - 1] for j in range(1, len(w))}
        self._stochastic = False  # set per call by perturb

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        self._stochastic = self.is_stochastic(model, x)
        if self._stochastic:
            return self._perturb_stochastic(model, x, y, generator)
        x_adv = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            x_run, loss_run, fooled_run = self._run(model, x[todo], y[todo], generator)
            # Keep a misclassified point, else the higher loss of this and earlier restarts.
            take = fooled_run | (loss_run > best_loss[todo])
            x_adv[todo[take]] = x_run[take]
            best_loss[todo] = torch.maximum(best_loss[todo], loss_run)
            fooled[todo] = fooled_run
        return x_adv

    def _perturb_stochastic(self, model: nn.Module, x: Tensor, y: Tensor,
                            generator: torch.Generator) -> Tensor:
        """Every restart on every example; per example the best point by the verdict's rule."""
        x_adv, score, loss = None, None, None
        for _ in range(self.restarts):
            run = self._full_run(model, x, y, generator)
            if x_adv is None:
                x_adv, score, loss = run.x_best, run.best_score, run.best_loss
                continue
            take = better(run.best_score, run.best_loss, score, loss)
            x_adv = torch.where(_per_example(take, x), run.x_best, x_adv)
            score, loss = torch.where(take, run.best_score, score), torch.where(take, run.best_loss, loss)
        return x_adv

    def _run(self, model: nn.Module, x: Tensor, y: Tensor,
             generator: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
        """One run of Algorithm 1; returns (x_adv, f_max, fooled)."""
        run = self._full_run(model, x, y, generator)
        x_adv = torch.where(_per_example(run.fooled, x), run.x_fooled, run.x_max)
        return x_adv, run.f_max, run.fooled

    def _full_run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> _Run:
        """Algorithm 1's iterations; on a deterministic model they stop once every example is
        misclassified, on a stochastic one they use the whole budget."""
        run = self._first_step(model, x, y, generator)
        for k in range(1, self.steps):
            if not self._stochastic and bool(run.fooled.all()):
                break
            self._observe(run, model, self._momentum_step(run, x), y, count=True)
            if k in self.windows:
                self._halve_where_stalled(run, self.windows[k])
        return run

    def _first_step(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> _Run:
        """x0 uniform in the ball, eta = 2 eps, x1 = P(x0 + eta step(grad f(x0)))."""
        x0 = self.ball.random_start(x, generator)
        loss0, grad0, fooled0, score0 = self._evaluate(model, x0, y)
        eta = torch.full_like(_per_example(loss0, x), 2.0 * self.ball.eps)
        run = _Run(x=x0, x_prev=x0, loss=loss0, grad=grad0, eta=eta,
                   x_max=x0, f_max=loss0, g_max=grad0, x_fooled=x0, fooled=fooled0,
                   x_best=x0, best_score=score0, best_loss=loss0,
                   increases=torch.zeros_like(loss0), reduced_last=torch.zeros_like(fooled0),
                   f_max_last=loss0)
        self._observe(run, model, self.ball.project(self.ball.step(x0, grad0, eta), x), y, count=False)
        return run

    def _momentum_step(self, run: _Run, x: Tensor) -> Tensor:
        """z = P(x_k + eta step(grad)); x_{k+1} = P(x_k + alpha(z - x_k) + (1 - alpha)(x_k - x_{k-1}))."""
        z = self.ball.project(self.ball.step(run.x, run.grad, run.eta), x)
        moved = run.x + self.alpha * (z - run.x) + (1.0 - self.alpha) * (run.x - run.x_prev)
        return self.ball.project(moved, x)

    def _observe(self, run: _Run, model: nn.Module, x_new: Tensor, y: Tensor, count: bool) -> None:
        """Evaluate x_{k+1}, make it the current iterate, update x_max and the broken examples."""
        loss, grad, fooled, score = self._evaluate(model, x_new, y)
        if self._stochastic:
            take = better(score, loss, run.best_score, run.best_loss)
            run.x_best = torch.where(_per_example(take, x_new), x_new, run.x_best)
            run.best_score = torch.where(take, score, run.best_score)
            run.best_loss = torch.where(take, loss, run.best_loss)
        if count:
            run.increases = run.increases + (loss > run.loss).float()
        improved = loss > run.f_max
        run.x_max = torch.where(_per_example(improved, x_new), x_new, run.x_max)
        run.g_max = torch.where(_per_example(improved, x_new), grad, run.g_max)
        run.f_max = torch.where(improved, loss, run.f_max)
        first_fooled = fooled & ~run.fooled
        run.x_fooled = torch.where(_per_example(first_fooled, x_new), x_new, run.x_fooled)
        run.fooled = run.fooled | fooled
        run.x_prev, run.x, run.loss, run.grad = run.x, x_new, loss, grad

    def _halve_where_stalled(self, run: _Run, window: int) -> None:
        """At checkpoint w_j: halve eta and restart from x_max where condition 1 or 2 holds."""
        oscillating = run.increases < self.rho * window                  # condition 1
        stuck = ~run.reduced_last & (run.f_max <= run.f_max_last)         # condition 2
        halve = oscillating | stuck
        h = _per_example(halve, run.x)
        run.eta = torch.where(h, run.eta / 2.0, run.eta)
        run.x = torch.where(h, run.x_max, run.x)
        run.x_prev = torch.where(h, run.x_max, run.x_prev)  # no momentum across a restart
        run.grad = torch.where(h, run.g_max, run.grad)
        run.loss = torch.where(halve, run.f_max, run.loss)
        run.reduced_last, run.f_max_last = halve, run.f_max
        run.increases = torch.zeros_like(run.increases)

    def _evaluate(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """EOT loss (N,), EOT gradient, whether the EOT-mean logits misclassify (N,), and the
        fraction of the EOT draws that classify correctly (N,), all from the same passes."""
        grad, loss, score, mean_logits = self.loss_gradient_score(model, x_adv, y, self.loss_fn)
        return loss, grad, mean_logits.argmax(1) != y, score


@ATTACKS.register("apgd-ce")
def _apgd_ce(eps: float, **kwargs) -> APGD:
    return APGD(eps=eps, loss="ce", **kwargs)


@ATTACKS.register("apgd-dlr")
def _apgd_dlr(eps: float, **kwargs) -> APGD:
    return APGD(eps=eps, loss="dlr", **kwargs)
