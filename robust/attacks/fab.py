"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), L-inf and L2.

"Minimally distorted adversarial examples with a fast adaptive boundary
attack", Algorithm 1, in the targeted form AutoAttack uses (FAB-T): for a
target class t the classifier is linearised at the current iterate x_i, and
pi = {z : f(x_i) + w.(z - x_i) = 0}, f = z_t - z_y, w = grad f(x_i), is the
approximate boundary.  With proj the minimal-norm projection onto pi
intersected with the box [0,1]^d (eq. 7),

    delta_i    = proj(x_i) - x_i,   delta_orig = proj(x_orig) - x_orig,
    alpha      = min(||delta_i|| / (||delta_i|| + ||delta_orig||), alpha_max),
    x_{i+1}    = clip((1 - alpha)(x_i + eta delta_i) + alpha (x_orig + eta delta_orig), 0, 1),

and whenever x_{i+1} is misclassified it is recorded if it is the closest so
far and pulled back towards the original, x_{i+1} = (1 - beta) x_orig + beta x_{i+1}
(the final search step).  eta = 1.05, alpha_max = 0.1, beta = 0.9 (section 3.2).
AutoAttack's FAB-T uses the 9 classes ranked after the top one at the clean
point as targets, 100 iterations and 1 restart: those are the defaults.

Two modes: bounded (AutoAttack; ``eps`` given): an example is broken when the
closest adversarial point lies within eps, which is then returned, and later
targets run only on examples not yet broken; minimal (``minimal=True``, eps
not needed): every target runs on every example and the closest adversarial
point over all targets is returned, unbounded.

Choices where the paper leaves room:
  * the projection (eq. 7) is solved exactly: its solution is clip(t d, l, u)
    with d = sign(w) (L-inf) or w (L2) and the scalar t found from the sorted
    breakpoints (:func:`project_onto_hyperplane_in_box`); where the hyperplane
    misses the box, the box point furthest along d is taken;
  * restarts after the first start from a uniform point of the ball of radius
    min(eps, ||best - x||) / 2 around x (the first run starts at x itself);
  * with EOT, f and w are the means over ``eot_samples`` passes;
  * "misclassified" is one pass on a deterministic model (the mean logits of
    ``eot_samples`` identical passes).  On a stochastic model it is a majority
    of ``eot_samples`` fresh draws (never the argmax of the EOT-mean logits);
    that decides the final search step, so FAB converges onto the vote's
    boundary, where a draw is right half the time.  In minimal mode a run's
    answer is therefore the first point along its closest such iterate's
    perturbation, scaled by 1, 1.05, ..., 2 (:data:`WALK`), that the
    minimal-norm rule accepts on fresh draws (:mod:`robust.attacks.minimal_norm`);
  * bounded mode on a stochastic model follows the verdict's rule
    (:mod:`robust.attacks.verdict`): an example is already broken only when
    every fresh draw misclassifies the clean input; the others run every
    target and restart until a point of the ball has all its draws wrong, and
    the point returned is, of the candidates, the one with the lowest fraction
    of ``eot_samples`` fresh draws correct (ties: the lower margin
    z_y - max_{k != y} z_k of the draws' mean logits).  The candidates are the
    clean input, every iterate inside the ball and, for every iterate, its
    perturbation scaled to the radius eps: FAB's iterates sit on the boundary,
    where a stochastic model is right about half the time, while the verdict
    asks for the point of the ball most draws get wrong (on a linear model with
    Gaussian input noise the scaled points are the ball's best);
  * where nothing adversarial was found (within eps when bounded) the clean
    input is returned.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS, minimal_norm, verdict
from robust.attacks.base import GradientAttack, threat_model
from robust.attacks.cw import margin

NORMS = ("linf", "l2")
#: Minimal mode on a stochastic model: the factors by which a run's boundary point is pushed
#: out until the minimal-norm rule accepts it (up to twice as far, in 5% steps).
WALK = tuple(1.0 + 0.05 * j for j in range(21))


def project_onto_hyperplane_in_box(point: Tensor, w: Tensor, r: Tensor, norm: str) -> Tensor:
    """delta of least ||delta||_p with w.delta = r and point + delta in [0,1]^d (FAB eq. 7).

    The minimiser is delta_j = clip(t d_j, -point_j, 1 - point_j) with
    d = sign(r) sign(w) (L-inf) or sign(r) w (L2) and t >= 0 the smallest
    value reaching w.delta = r; as t grows, coordinate j saturates at
    t_j = room_j / |d_j|, so w.delta is piecewise linear in t and t is read off
    the sorted t_j.  If even the saturated delta falls short, it is returned.
    Shapes: point, w (N, ...), r (N,) -> delta (N, ...).
    """
    shape = point.shape
    p, g = point.flatten(1).double(), w.flatten(1).double()
    s = torch.sign(r.double())[:, None]
    d = s * (torch.sign(g) if norm == "linf" else g)
    room = torch.where(d > 0, 1.0 - p, p)                      # distance to the box along d
    a = (g * d).abs()                                           # slope of w.delta while j is free
    c = (g.abs() * room)                                        # w.delta gained once j saturates
    free = d != 0
    t_sat = torch.where(free, room / d.abs().clamp_min(1e-300), torch.full_like(p, float("inf")))
    t_sorted, order = t_sat.sort(dim=1)
    a_sorted, c_sorted = a.gather(1, order), c.gather(1, order)
    saturated_gain = c_sorted.cumsum(1)
    free_slope = a_sorted.flip(1).cumsum(1).flip(1) - a_sorted   # sum over coordinates still free
    t_finite = torch.where(torch.isfinite(t_sorted), t_sorted, torch.zeros_like(t_sorted))
    reach = saturated_gain + t_finite * free_slope               # |w.delta| at each breakpoint
    target = r.double().abs()[:, None]
    k = (reach < target).sum(1, keepdim=True)                    # breakpoints passed before the solution
    m = p.shape[1]
    prev = (k - 1).clamp(min=0)
    gain_before = torch.where(k > 0, saturated_gain.gather(1, prev), torch.zeros_like(target))
    slope_after = torch.where(k > 0, free_slope.gather(1, prev), a_sorted.sum(1, keepdim=True))
    t = (target - gain_before) / slope_after.clamp_min(1e-300)
    t = torch.where(k >= m, torch.full_like(t, float("inf")), t)  # unreachable: saturate everything
    delta = torch.where(free, torch.clamp(t * d, -p, 1.0 - p), torch.zeros_like(p))
    return delta.to(point.dtype).view(shape)


class FABTargeted(GradientAttack):
    """FAB-T (Croce & Hein 2020), targeted, L-inf or L2; bounded by ``eps`` or minimal-norm.

    Args:
        eps: the budget (bounded mode; also scales restarts); None with ``minimal=True``;
        norm: 'linf' or 'l2'; targets: target classes (9, AutoAttack);
        steps: iterations per run (100, AutoAttack); restarts: runs per target (1, AutoAttack);
        eta: overshoot (1.05); alpha_max: largest weight of the original point (0.1);
        beta: final-search pull towards the original (0.9) (section 3.2);
        minimal: return the closest adversarial point found, whatever its size;
        seed: seeds the restarts; eot_samples, eot_chunk: see GradientAttack.
    Stochastic model: "misclassified" is a majority of fresh draws; minimal mode returns points
    a binomial test on fresh draws puts past the vote boundary; bounded mode returns the ball's
    point with the fewest draws correct (module docstring).
    Shapes: x (N,C,H,W) in [0,1], y (N,) -> x_adv like x.
    Example: ``FABTargeted(eps=8/255)(model, x, y)``, ``FABTargeted(norm="l2", minimal=True)(model, x, y)``.
    """

    name = "fab-t"

    def __init__(self, eps: Optional[float] = None, norm: str = "linf", targets: int = 9, steps: int = 100,
                 restarts: int = 1, eta: float = 1.05, alpha_max: float = 0.1, beta: float = 0.9,
                 minimal: bool = False, seed: int = 0, eot_samples: int = 1,
                 eot_chunk: Optional[int] = None) -> None:
        super().__init__(eot_samples=eot_samples, eot_chunk=eot_chunk)
        if norm not in NORMS:
            raise ValueError(f"unknown FAB norm {norm!r}; valid choices: {', '.join(NORMS)}")
        if eps is None and not minimal:
            raise ValueError("FAB-T needs eps unless minimal=True")
        self.ball = threat_model(norm, eps) if eps is not None else None
        if targets < 1 or steps < 1 or restarts < 1:
            raise ValueError(f"targets, steps and restarts must be >= 1, got {targets}, {steps}, {restarts}")
        if not (eta >= 1 and 0 <= alpha_max <= 1 and 0 < beta <= 1):
            raise ValueError(f"need eta >= 1, 0 <= alpha_max <= 1, 0 < beta <= 1; got {eta}, {alpha_max}, {beta}")
        self.norm, self.targets, self.steps, self.restarts = norm, targets, steps, restarts
        self.eta, self.alpha_max, self.beta, self.minimal, self.seed = eta, alpha_max, beta, minimal, seed

    def _size(self, delta: Tensor) -> Tensor:
        flat = delta.flatten(1)
        return flat.abs().amax(1) if self.norm == "linf" else flat.norm(dim=1)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        stochastic = self.is_stochastic(model, x)
        best = x.clone()
        best_size = torch.full((x.shape[0],), float("inf"), device=x.device)
        kept = None  # bounded, stochastic: the ball's point the verdict most likely counts broken
        if stochastic:
            draws = minimal_norm.fresh_draws(self, model, x)
            logits, score = draws.mean(0), verdict.correct_fraction(draws, y)
            if self.minimal:
                best_size[minimal_norm.confirm(self, model, x, y, score)] = 0.0  # already misclassified
            else:
                kept = (x.clone(), score, -margin(logits, y))
        else:
            logits = self._mean_logits(model, x)
            best_size[logits.argmax(1) != y] = 0.0  # already misclassified
        ranking = logits.argsort(dim=1, descending=True)
        budget = float("inf") if self.minimal else self.ball.eps
        for rank in range(1, min(self.targets, logits.shape[1] - 1) + 1):
            for restart in range(self.restarts):
                if kept is not None:  # broken: every draw misclassifies the kept point
                    todo = (kept[1] > 0).nonzero().squeeze(1)
                else:
                    todo = (best_size > budget).nonzero().squeeze(1) if not self.minimal else \
                        (best_size > 0).nonzero().squeeze(1)
                if todo.numel() == 0:
                    return best if kept is None else kept[0]
                x_run, size_run, kept_run = self._run(model, x[todo], y[todo], ranking[todo, rank],
                                                      best_size[todo], restart > 0, generator, stochastic)
                better = size_run < best_size[todo]
                best[todo[better]], best_size[todo[better]] = x_run[better], size_run[better]
                if kept is not None:
                    self._keep(kept, todo, kept_run)
        if kept is not None:
            return kept[0]
        if not self.minimal:  # outside the budget the attack failed
            best[best_size > budget] = x[best_size > budget]
        return best

    @staticmethod
    def _keep(kept: Tuple[Tensor, Tensor, Tensor], todo: Tensor, run: Tuple[Tensor, Tensor, Tensor]) -> None:
        """Replace, in place, the kept (point, score, loss) of examples ``todo`` where the run's
        beats it by the verdict's rule (lower score; ties: higher loss)."""
        wins = verdict.better(run[1], run[2], kept[1][todo], kept[2][todo])
        for mine, theirs in zip(kept, run):
            mine[todo[wins]] = theirs[wins]

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor, best_size: Tensor,
             random_start: bool, generator: torch.Generator,
             stochastic: bool) -> Tuple[Tensor, Tensor, Optional[Tuple[Tensor, Tensor, Tensor]]]:
        """One run of Algorithm 1 towards ``target``: (closest adversarial point, its size; inf if
        none), and in bounded mode on a stochastic model the run's (point, score, loss) best by
        the verdict's rule among its candidates in the ball (score inf if none), else None.

        On a stochastic model "adversarial" is a majority of draws wrong in bounded mode (the
        point only sizes the restarts) and the minimal-norm rule in minimal mode."""
        x_i = x.clone()
        if random_start:
            radius = torch.minimum(best_size, torch.full_like(best_size, self._budget_or_inf())) / 2
            radius = torch.where(torch.isfinite(radius), radius, torch.zeros_like(radius))
            x_i = self._random_point(x, radius, generator)
        found = x.clone()
        found_size = torch.full_like(best_size, float("inf"))
        kept = None
        if stochastic and not self.minimal:
            kept = (x.clone(), torch.full_like(best_size, float("inf")), torch.full_like(best_size, -float("inf")))
        for _ in range(self.steps):
            value, grad = self._linearise(model, x_i, y, target)
            delta = project_onto_hyperplane_in_box(x_i, grad, -value, self.norm)
            r_orig = -(value + (grad * (x - x_i)).flatten(1).sum(1))
            delta_orig = project_onto_hyperplane_in_box(x, grad, r_orig, self.norm)
            n_i, n_o = self._size(delta), self._size(delta_orig)
            alpha = torch.where(n_i + n_o > 0, n_i / (n_i + n_o).clamp_min(1e-12), torch.zeros_like(n_i))
            alpha = alpha.clamp(max=self.alpha_max).view(-1, *([1] * (x.dim() - 1)))
            x_i = torch.clamp((1 - alpha) * (x_i + self.eta * delta) + alpha * (x + self.eta * delta_orig),
                              0.0, 1.0)
            size = self._size(x_i - x)
            if stochastic:
                fooled = self._majority_wrong(model, x, x_i, y, size, kept)
            else:
                fooled = self._mean_logits(model, x_i).argmax(1) != y
            closer = fooled & (size < found_size)
            found[closer], found_size[closer] = x_i[closer], size[closer]
            x_i = torch.where(fooled.view(-1, *([1] * (x.dim() - 1))),
                              (1 - self.beta) * x + self.beta * x_i, x_i)  # final search step
        if stochastic and self.minimal:
            found, found_size = self._confirm_outward(model, x, y, found, found_size)
        return found, found_size, kept

    def _confirm_outward(self, model: nn.Module, x: Tensor, y: Tensor, point: Tensor,
                         size: Tensor) -> Tuple[Tensor, Tensor]:
        """The first of x + g (point - x), g in :data:`WALK`, that the minimal-norm rule accepts
        (:func:`robust.attacks.minimal_norm.confirm` on fresh draws), and its size (inf: none).

        ``point`` is the run's closest iterate a majority of draws misclassified: on a
        stochastic model FAB converges onto the vote boundary, where the confirmation is a
        coin flip, so the run's answer is the nearest point past it along FAB's direction.
        """
        out, out_size = x.clone(), torch.full_like(size, float("inf"))
        for g in WALK:
            idx = (torch.isfinite(size) & ~torch.isfinite(out_size)).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            candidate = torch.clamp(x[idx] + g * (point[idx] - x[idx]), 0.0, 1.0)
            screen = verdict.correct_fraction(minimal_norm.fresh_draws(self, model, candidate), y[idx])
            ok = minimal_norm.confirm(self, model, candidate, y[idx], screen)
            out[idx[ok]], out_size[idx[ok]] = candidate[ok], self._size(candidate[ok] - x[idx[ok]])
        return out, out_size

    def _majority_wrong(self, model: nn.Module, x: Tensor, x_i: Tensor, y: Tensor, size: Tensor,
                        kept: Optional[Tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """Whether a majority of ``eot_samples`` fresh draws misclassifies the iterate x_i (of
        perturbation ``size``) (N,): the final search step's test.  In bounded mode, offer
        ``kept`` x_i if it lies in the ball, and x_i's perturbation scaled to the ball's radius."""
        draws = minimal_norm.fresh_draws(self, model, x_i)
        score = verdict.correct_fraction(draws, y)
        if kept is not None:
            everyone = torch.arange(len(y), device=y.device)
            inside = torch.where(size <= self.ball.eps, score, torch.full_like(score, float("inf")))
            self._keep(kept, everyone, (x_i, inside, -margin(draws.mean(0), y)))
            x_edge = self._to_edge(x, x_i, size)
            edge = minimal_norm.fresh_draws(self, model, x_edge)
            self._keep(kept, everyone, (x_edge, verdict.correct_fraction(edge, y), -margin(edge.mean(0), y)))
        return score < minimal_norm.MAJORITY

    def _to_edge(self, x: Tensor, x_i: Tensor, size: Tensor) -> Tensor:
        """x_i's perturbation scaled to the radius eps (then projected onto the ball and box)."""
        factor = torch.where(size > 0, self.ball.eps / size.clamp_min(1e-12), torch.zeros_like(size))
        return self.ball.project(x + factor.view(-1, *([1] * (x.dim() - 1))) * (x_i - x), x)

    def _budget_or_inf(self) -> float:
        return self.ball.eps if self.ball is not None else float("inf")

    def _random_point(self, x: Tensor, radius: Tensor, generator: torch.Generator) -> Tensor:
        """A point of the ball of per-example ``radius`` around x, clipped to [0, 1]."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        if self.norm == "linf":
            noise = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
        return torch.clamp(x + radius.view(shape) * noise, 0.0, 1.0)

    def _linearise(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
        """EOT mean of f = z_t - z_y (N,) and its input gradient."""
        n = x.shape[0]

        def difference(logits: Tensor, ys: Tensor) -> Tensor:
            t = target.repeat(logits.shape[0] // n)
            return logits.gather(1, t[:, None]).squeeze(1) - logits.gather(1, ys[:, None]).squeeze(1)

        grad, value = self.loss_and_gradient(model, x, y, difference)
        return value, grad

    @torch.no_grad()
    def _mean_logits(self, model: nn.Module, x: Tensor) -> Tensor:
        return sum(model(x).float() for _ in range(self.eot_samples)) / self.eot_samples


@ATTACKS.register("fab-t")
def _fab_t(eps: Optional[float] = None, **kwargs) -> FABTargeted:
    return FABTargeted(eps=eps, **kwargs)
