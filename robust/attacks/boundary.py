"""Boundary attack (Brendel, Rauber & Bethge, ICLR 2018): decision-based, L2.

"Decision-based adversarial attacks: reliable attacks against black-box
machine learning models".  Only the top-1 decision is queried.  The attack
starts from an adversarial point (uniform noise, section 3.1, moved as close
to the clean image as a binary search along the line allows) and walks along
the decision boundary towards the clean image o.  Each step (section 3.2,
Fig. 2) draws eta ~ N(0, I), makes it orthogonal to the direction to o and
rescales it to delta times the current distance, projects the point back onto
the sphere around o, then moves a fraction epsilon of the distance towards o;
the result is kept only if it is still adversarial.  Step sizes adapt
(section 3.3): delta so that about half of the orthogonal steps stay
adversarial, epsilon so that about a fifth of the full steps succeed.

Choices (documented): one candidate per step; the success rates are measured
per example over windows of ``adapt_every`` = 10 steps and the sizes scaled
by 1.5 up or down; ``steps`` = 1000 by default (2 queries per step) where the
paper runs far longer on ImageNet.

On a stochastic model (QueryAttack, the verdict's rule) every decision is taken
from k = ``query_draws`` draws and a point counts as adversarial only where every
draw misclassifies it: the clean image is "already misclassified", a noise start
is found, the binary search's upper end holds, and a step is accepted, only so.
The walk then follows the boundary of the region that the model misclassifies
with high probability; with one draw it drifts towards points that a lucky draw
misclassified.  That region may lie beyond the budget where the model's
probability of error rises slowly (the walk stalls outside it), so a bounded walk
that ends outside the budget offers one more candidate: its point moved along the
line to the clean image onto the eps-sphere, returned where its k draws score
(fraction correct) below the clean image's.  Measured on the digits small-cnn
with input noise (sigma 0.3, 32 examples, 300 steps, L2 eps 1.5): fresh-draw
robust score 0.646 with k = 8 against 0.690 with k = 1; a majority of the k draws
as acceptance gave 0.657 and walks to points that fresh draws classify correctly
more often, so the every-draw rule is kept.  On a deterministic model the attack
is the paper's (a walk short of the budget returns the clean image).

Threat model: with a finite eps (L2) the attack succeeds on an example when
it reaches a distance <= eps, stops there, and returns the clean image
otherwise (so accuracy under it is comparable to L2 PGD at the same eps);
with eps = inf it is a minimal-norm attack that returns the closest
adversarial point found (the row's distance is its L2 norm).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS
from robust.attacks.queries import DEFAULT_QUERY_DRAWS, QueryAttack, check_positive_int


def _norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class Boundary(QueryAttack):
    """Decision-based L2 attack that walks along the boundary towards the clean image.

    Args:
        eps: L2 budget (success at distance <= eps) or inf (minimal-norm mode).
        steps: boundary steps (2 queries each, 1000).
        spherical_step: delta, orthogonal step relative to the distance (0.01, as in the paper's code release).
        source_step: epsilon, step towards the clean image relative to the distance (0.01).
        adapt_every: steps per window of the step-size adaptation (10).
        init_tries: uniform-noise draws to find an adversarial start (100).
        seed: seeds the noise.  query_chunk, query_draws: see QueryAttack.
    Shapes: x (N,C,H,W) in [0,1], y (N,) -> x_adv like x.  After a call ``queries`` (N,)
    holds the model input rows spent per example.
    Example: ``Boundary(eps=0.5, steps=1000)(model, x, y)``.
    """

    name = "boundary"

    def __init__(self, eps: float = math.inf, steps: int = 1000, spherical_step: float = 0.01,
                 source_step: float = 0.01, adapt_every: int = 10, init_tries: int = 100, seed: int = 0,
                 query_chunk: Optional[int] = None, query_draws: int = DEFAULT_QUERY_DRAWS) -> None:
        super().__init__(query_chunk, query_draws)
        if not eps > 0:
            raise ValueError(f"boundary: eps must be > 0 (or inf), got {eps}")
        if not (0 < spherical_step < 1 and 0 < source_step < 1):
            raise ValueError(f"boundary: step sizes must be in (0, 1), got {spherical_step}, {source_step}")
        self.eps = float(eps)
        self.steps = check_positive_int("steps", steps)
        self.spherical_step, self.source_step = float(spherical_step), float(source_step)
        self.adapt_every = check_positive_int("adapt_every", adapt_every)
        self.init_tries = check_positive_int("init_tries", init_tries)
        self.seed = seed

    def _start(self, model: nn.Module, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(adversarial start, found) by uniform noise then a binary search towards x (section 3.1)."""
        everyone = torch.arange(len(x), device=x.device)
        start, found = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.init_tries):
            if bool(found.all()):
                break
            noise = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)
            hit = ~found & self.broken(model, noise, y, everyone)
            start[hit], found = noise[hit], found | hit
        lo = torch.zeros(len(x), device=x.device, dtype=x.dtype)   # blend 0 = x (not adversarial)
        hi = torch.ones(len(x), device=x.device, dtype=x.dtype)    # blend 1 = start (adversarial)
        for _ in range(10):
            mid = (lo + hi) / 2
            adv = self.broken(model, x + _bcast(mid, x) * (start - x), y, everyone)
            hi, lo = torch.where(adv, mid, hi), torch.where(adv, lo, mid)
        return torch.where(_bcast(found, x), x + _bcast(hi, x) * (start - x), x), found

    def _candidate(self, x: Tensor, cur: Tensor, delta: Tensor, epsilon: Tensor,
                   g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(point after the orthogonal step, point after the step towards x)."""
        to_x = x - cur
        dist = _bcast(_norms(to_x), x)
        eta = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        unit = to_x / dist.clamp_min(1e-12)
        eta = eta - _bcast((eta * unit).flatten(1).sum(1), x) * unit   # orthogonal to the direction to x
        eta = eta * _bcast(delta, x) * dist / _bcast(_norms(eta), x).clamp_min(1e-12)
        sphere = cur + eta
        sphere = x + (sphere - x) * dist / _bcast(_norms(sphere - x), x).clamp_min(1e-12)
        sphere = sphere.clamp(0, 1)
        return sphere, (sphere + _bcast(epsilon, x) * (x - sphere)).clamp(0, 1)

    def search(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        g = torch.Generator(device=x.device).manual_seed(self.seed)
        everyone = torch.arange(len(x), device=x.device)
        clean_score, _ = self.query(model, x, y, everyone)
        already = clean_score == 0  # every draw misclassifies the clean image
        cur, found = self._start(model, x, y, g)
        cur = torch.where(_bcast(already, x), x, cur)
        n = len(x)
        delta = torch.full((n,), self.spherical_step, device=x.device, dtype=x.dtype)
        epsilon = torch.full((n,), self.source_step, device=x.device, dtype=x.dtype)
        sphere_ok = torch.zeros(n, device=x.device)
        step_ok = torch.zeros(n, device=x.device)
        for k in range(1, self.steps + 1):
            active = found & ~already
            if math.isfinite(self.eps):  # bounded: an example inside the budget is done
                active &= _norms(cur - x) > self.eps
            if not bool(active.any()):
                break
            idx = active.nonzero().squeeze(1)
            sphere, cand = self._candidate(x[idx], cur[idx], delta[idx], epsilon[idx], g)
            on_sphere = self.broken(model, sphere, y[idx], idx)
            ok = self.broken(model, cand, y[idx], idx)
            cur[idx] = torch.where(_bcast(ok, cand), cand, cur[idx])
            sphere_ok[idx] += on_sphere.float()
            step_ok[idx] += ok.float()
            if k % self.adapt_every == 0:  # section 3.3: ~50% orthogonal, ~20% full steps succeed
                rate_s, rate_t = sphere_ok / self.adapt_every, step_ok / self.adapt_every
                delta = torch.where(rate_s > 0.5, delta * 1.5, delta / 1.5).clamp(1e-6, 0.5)
                epsilon = torch.where(rate_t > 0.2, epsilon * 1.5, epsilon / 1.5).clamp(1e-6, 0.5)
                sphere_ok.zero_()
                step_ok.zero_()
        if not math.isfinite(self.eps):
            return cur
        inside = _norms(cur - x) <= self.eps + 1e-6
        if self.stochastic:
            cur = self._pull_into_budget(model, x, y, cur, found & ~already & ~inside, clean_score)
            inside = _norms(cur - x) <= self.eps + 1e-6
        return torch.where(_bcast(inside, x), cur, x)  # bounded: a point outside the budget is a failure

    def _pull_into_budget(self, model: nn.Module, x: Tensor, y: Tensor, cur: Tensor, short: Tensor,
                          clean_score: Tensor) -> Tensor:
        """Stochastic models: where the walk ended outside the budget (``short``), its point moved
        along the line to x onto the eps-sphere, kept where its k draws score below x's."""
        if not bool(short.any()):
            return cur
        idx = short.nonzero().squeeze(1)
        to_cur = cur[idx] - x[idx]
        pulled = (x[idx] + to_cur * (self.eps / _bcast(_norms(to_cur), to_cur))).clamp(0, 1)
        score, _ = self.query(model, pulled, y[idx], idx)
        won = score < clean_score[idx]
        out = cur.clone()
        out[idx[won]] = pulled[won]
        return out


@ATTACKS.register("boundary")
def _boundary(eps: float = math.inf, minimal: bool = False, **kwargs) -> Boundary:
    """``minimal=True`` (the suite's boundary-min, a minimal-norm attack) means eps = inf."""
    norm = kwargs.pop("norm", "l2")
    if norm != "l2":
        raise ValueError(f"boundary is an L2 attack: its norm is 'l2', got {norm!r}")
    return Boundary(eps=math.inf if minimal else float(eps), **kwargs)
