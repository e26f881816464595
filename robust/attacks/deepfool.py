"""DeepFool, L2, multi-class (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016, Algorithm 2).

A minimal-norm attack: it has no budget.  At each iteration the classifier is
linearised at the current point, and the point moves onto the nearest of the
linearised boundaries between the label y and another class k,

    l = argmin_{k != y} |f'_k| / ||w'_k||_2,   f'_k = f_k - f_y,  w'_k = grad f_k - grad f_y,
    r_i = |f'_l| / ||w'_l||_2^2 * w'_l                                         (Algorithm 2),

until the label changes.  The total step is scaled by (1 + overshoot) with
overshoot 0.02 (section 3.2), the paper's and Foolbox's default used by the SDR
paper.  On an affine classifier one iteration lands on the closest boundary,
so the perturbation is the closed-form minimum times 1.02.

Choices where the paper leaves room:
  * the label is checked on x + (1 + overshoot) r_tot clipped to [0, 1] (the
    point the attack returns), so the overshoot also helps convergence;
  * every other class is a candidate (``candidates`` limits them to the
    highest-scoring ones at the clean point, as the paper suggests for many classes);
  * each step aims ``crossing`` (1e-4) logit units past the linearised
    boundary, r_i = (|f'_l| + 1e-4) / ||w'_l||^2 w'_l, as the authors' code
    does: with the box [0, 1] clipping the step, the plain step only
    approaches a curved boundary geometrically and may never cross it;
  * an input gradient difference of zero (masked gradients) gives a zero step:
    the example stays where it is and counts as not broken;
  * where the label never changes within ``steps`` iterations the clean input
    is returned (the attack failed; the protocol records an infinite distance);
  * with EOT the values and gradients of f'_k are the means over
    ``eot_samples`` stochastic passes;
  * "label changed" is one pass on a deterministic model (the mean logits of
    ``eot_samples`` identical passes); on a stochastic model it is the verdict's
    rule for minimal-norm attacks (:mod:`robust.attacks.minimal_norm`): fewer
    than half of the linearisation's draws at the point classify it correctly,
    and fresh draws confirm it by a binomial test; never the argmax of the
    EOT-mean logits.  An unconfirmed point keeps iterating; a confirmed one ends
    the search, since every later step moves further from x.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS, minimal_norm, verdict
from robust.attacks.base import GradientAttack


class DeepFool(GradientAttack):
    """Multi-class L2 DeepFool (Moosavi-Dezfooli et al. 2016, Algorithm 2), unbounded.

    Args:
        steps: maximum iterations (50, Foolbox's default);
        overshoot: the total step is (1 + overshoot) r_tot (0.02, section 3.2);
        crossing: logit margin each step aims past the linearised boundary (1e-4);
        candidates: the classes considered, the top ones at the clean point (None: all);
        seed: accepted for a uniform attack signature (DeepFool draws nothing);
        eot_samples, eot_chunk: see GradientAttack.
    Stochastic model: the label has changed when a binomial test on fresh draws puts the point
    past the vote boundary, not when the EOT-mean logits say so (module docstring).
    Shapes: x (N,C,H,W) in [0,1], y (N,) -> x_adv like x (x itself where the attack failed).
    Example: ``DeepFool()(model, x, y)``.
    """

    name = "deepfool"

    def __init__(self, steps: int = 50, overshoot: float = 0.02, crossing: float = 1e-4,
                 candidates: Optional[int] = None,
                 seed: int = 0, eot_samples: int = 1, eot_chunk: Optional[int] = None) -> None:
        super().__init__(eot_samples=eot_samples, eot_chunk=eot_chunk)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not overshoot >= 0:
            raise ValueError(f"overshoot must be >= 0, got {overshoot}")
        if candidates is not None and candidates < 2:
            raise ValueError(f"candidates must be >= 2 or None, got {candidates}")
        if not crossing >= 0:
            raise ValueError(f"crossing must be >= 0, got {crossing}")
        self.steps, self.overshoot, self.candidates = steps, float(overshoot), candidates
        self.crossing = float(crossing)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        stochastic = self.is_stochastic(model, x)
        logits, fooled = self._judge_fresh(model, x, y, stochastic)  # already misclassified: distance 0
        classes = self._candidate_classes(logits, y)
        r_tot, x_adv = torch.zeros_like(x), x.clone()
        for step in range(self.steps + 1):
            idx = (~fooled).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            if step == self.steps:  # only check the label of the last step
                fooled[idx] = self._judge_fresh(model, x_adv[idx], y[idx], stochastic)[1]
                break
            values, grads, logits, score = self._linearise(model, x_adv[idx], y[idx], classes[idx])
            if stochastic:
                now = minimal_norm.confirm(self, model, x_adv[idx], y[idx], score)
            else:
                now = logits.argmax(1) != y[idx]
            fooled[idx[now]] = True
            idx, values, grads = idx[~now], values[~now], grads[:, ~now]
            r_tot[idx] = r_tot[idx] + self._step_to_nearest_boundary(values, grads, self.crossing)
            x_adv[idx] = torch.clamp(x[idx] + (1.0 + self.overshoot) * r_tot[idx], 0.0, 1.0)
        return torch.where(fooled.view(-1, *([1] * (x.dim() - 1))), x_adv, x)

    @torch.no_grad()
    def _judge_fresh(self, model: nn.Module, x: Tensor, y: Tensor, stochastic: bool) -> Tuple[Tensor, Tensor]:
        """Logits averaged over ``eot_samples`` passes (N, K) and whether x is misclassified (N,):
        by the mean logits on a deterministic model, by the minimal-norm rule on a stochastic one."""
        if stochastic:
            draws = minimal_norm.fresh_draws(self, model, x)
            return draws.mean(0), minimal_norm.confirm(self, model, x, y, verdict.correct_fraction(draws, y))
        logits = sum(model(x).float() for _ in range(self.eot_samples)) / self.eot_samples
        return logits, logits.argmax(1) != y

    def _candidate_classes(self, logits: Tensor, y: Tensor) -> Tensor:
        """(N, m) class indices k != y: all others, or the top ``candidates`` - 1 by logit."""
        masked = logits.scatter(1, y[:, None], float("-inf"))
        m = logits.shape[1] - 1 if self.candidates is None else min(self.candidates, logits.shape[1]) - 1
        return masked.topk(m, dim=1).indices

    @staticmethod
    def _step_to_nearest_boundary(values: Tensor, grads: Tensor, crossing: float) -> Tensor:
        """r = (|f'_l| + crossing) / ||w'_l||^2 w'_l, l the boundary of least |f'_k| / ||w'_k|| (Algorithm 2).

        values (N, m), grads (m, N, ...) -> r (N, ...).  A zero gradient gives a zero step.
        """
        norms = grads.flatten(2).norm(dim=2).t()                         # (N, m)
        distance = values.abs() / norms.clamp_min(1e-12)
        nearest = distance.argmin(1)
        rows = torch.arange(values.shape[0], device=values.device)
        w = grads[nearest, rows]                                         # (N, ...)
        f = values[rows, nearest].abs() + crossing
        norm_sq = norms[rows, nearest].pow(2)
        scale = torch.where(norm_sq > 0, f / norm_sq.clamp_min(1e-24), torch.zeros_like(f))
        return scale.view(-1, *([1] * (w.dim() - 1))) * w

    def _linearise(self, model: nn.Module, x: Tensor, y: Tensor,
                   classes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """EOT means of f'_k = z_k - z_y for k in ``classes`` (N, m), their input gradients
        (m, N, ...), the mean logits (N, K) and the fraction of the passes whose top-1
        class is y (N,).

        The S stochastic passes are stacked along the batch as in GradientAttack,
        and one forward pass serves the m backward passes.
        """
        n = x.shape[0]
        x = x.detach().requires_grad_(True)
        m = classes.shape[1]
        grads = torch.zeros((m,) + tuple(x.shape), device=x.device, dtype=x.dtype)
        values = torch.zeros(n, m, device=x.device)
        logit_sum, hits = 0.0, torch.zeros(n, device=x.device)
        remaining = self.eot_samples
        while remaining > 0:
            copies = min(self.copies_per_pass(model, x), remaining)
            xs = x.repeat(copies, *([1] * (x.dim() - 1))) if copies > 1 else x
            per_copy = model(xs).float().view(copies, n, -1)
            logits = per_copy.sum(0)                                     # summed over the copies
            diff = logits.gather(1, classes) - logits.gather(1, y[:, None])
            for k in range(m):
                grads[k] += torch.autograd.grad(diff[:, k].sum(), x, retain_graph=k < m - 1)[0]
            values += diff.detach()
            logit_sum = logit_sum + logits.detach()
            hits += (per_copy.detach().argmax(-1) == y[None]).float().sum(0)
            remaining -= copies
        s = self.eot_samples
        return values / s, grads / s, logit_sum / s, hits / s


@ATTACKS.register("deepfool")
def _deepfool(**kwargs) -> DeepFool:
    return DeepFool(**kwargs)

