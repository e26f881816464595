"""Square Attack, L-inf, score-based (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020).

A random search that queries only the model's outputs (no gradients).  It
starts from vertical stripes x + eps * (random sign per channel and column)
(section 3.3) and then, at each iteration, proposes to set one random square
window of side h_i, per channel, to x +- eps (Algorithm 2), keeping the
proposal where it lowers the margin loss

    L(x') = z_y(x') - max_{k != y} z_k(x')                                  (section 3)

and stopping per example as soon as L < 0 (misclassified).  The side h_i is
round(sqrt(p_i H W)), at least 1 and at most H - 1, and p_i starts at p_init =
0.8 (AutoAttack's L-inf value) and halves at iterations 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 of a 10,000-query run, rescaled to the query
budget (the paper's schedule, section 3 and appendix).  AutoAttack runs 5,000
queries with one restart: the default.

Choices where the paper leaves room:
  * a proposal that would leave the window unchanged (all channels already at
    the sampled values) is resampled, up to ``resample`` times, so that queries
    are not wasted (the reference code resamples as well);
  * on a stochastic model each query's scores are the mean of ``eot_samples``
    passes (1 by default: the protocol does not force EOT on black-box attacks);
    more passes make acceptance less noisy at S times the queries;
  * the query count includes the initial point: ``queries`` = 1 + iterations.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS
from robust.attacks.base import threat_model
from robust.attacks.queries import QueryAttack, check_positive_int

#: Iterations (of a 10,000-query run) after which p halves (Andriushchenko et al. 2020).
HALVING_POINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init: float, iteration: int, queries: int) -> float:
    """p_i: the fraction of pixels in the window at ``iteration`` of a ``queries`` run."""
    rescaled = int(iteration / queries * 10000)
    return p_init / 2 ** sum(rescaled > point for point in HALVING_POINTS)


class SquareLinf(QueryAttack):
    """Score-based L-inf Square Attack (Andriushchenko et al. 2020, Algorithm 1 with 2).

    Args:
        eps: L-inf budget; queries: model queries per example (5,000, AutoAttack);
        p_init: initial fraction of pixels per square (0.8, AutoAttack's L-inf value);
        restarts: independent runs on the examples still not broken (1, AutoAttack);
        resample: tries to draw a proposal that changes the window;
        eot_samples: passes averaged per query on stochastic models (1);
        seed: seeds the stripes, windows and signs; query_chunk: see QueryAttack.
    Shapes: x (N,C,H,W) in [0,1] with H, W >= 2, y (N,) -> x_adv like x inside the eps-ball.
    Example: ``SquareLinf(eps=8/255, queries=5000)(model, x, y)``.
    """

    name = "square"

    def __init__(self, eps: float, queries: int = 5000, p_init: float = 0.8, restarts: int = 1,
                 resample: int = 10, eot_samples: int = 1, seed: int = 0,
                 query_chunk: Optional[int] = None) -> None:
        super().__init__(query_chunk=query_chunk)
        self.ball = threat_model("linf", eps)
        self.queries = check_positive_int("queries", queries)
        self.restarts = check_positive_int("restarts", restarts)
        self.resample = check_positive_int("resample", resample, minimum=0)
        self.eot_samples = check_positive_int("eot_samples", eot_samples)
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init}")
        self.p_init, self.seed = float(p_init), seed

    def margin(self, model: nn.Module, xs: Tensor, y: Tensor) -> Tensor:
        """z_y - max_{k != y} z_k of the (EOT-mean) scores, (M,); < 0 means misclassified."""
        logits = sum(self.logits(model, xs).float() for _ in range(self.eot_samples)) / self.eot_samples
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        return z_y - logits.scatter(1, y[:, None], float("-inf")).max(1).values

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if x.dim() != 4 or min(x.shape[2:]) < 2:
            raise ValueError(f"Square needs images (N, C, H, W) with H, W >= 2, got {tuple(x.shape)}")
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        x_adv = x.clone()
        loss = self.margin(model, x, y)
        for _ in range(self.restarts):
            todo = (loss >= 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            x_run, loss_run = self._run(model, x[todo], y[todo], generator)
            better = loss_run < loss[todo]
            x_adv[todo[better]], loss[todo[better]] = x_run[better], loss_run[better]
        return x_adv

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        eps = self.ball.eps
        stripes = self._signs((n, c, 1, w), x, generator)
        best = torch.clamp(x + eps * stripes, 0.0, 1.0)
        loss = self.margin(model, best, y)
        for i in range(1, self.queries):
            active = (loss >= 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            side = int(round(math.sqrt(square_fraction(self.p_init, i, self.queries) * h * w)))
            side = max(1, min(side, min(h, w) - 1))
            proposal = self._propose(x[active], best[active], side, generator)
            new_loss = self.margin(model, proposal, y[active])
            improved = new_loss < loss[active]
            best[active[improved]], loss[active[improved]] = proposal[improved], new_loss[improved]
        return best, loss

    def _propose(self, x: Tensor, current: Tensor, side: int, generator: torch.Generator) -> Tensor:
        """``current`` with one random side x side window per example set to clip(x +- eps) per channel."""
        n, c, h, w = x.shape
        rows = torch.randint(0, h - side + 1, (n, 1), generator=generator, device=x.device)
        cols = torch.randint(0, w - side + 1, (n, 1), generator=generator, device=x.device)
        r, s = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        window = (((r >= rows) & (r < rows + side))[:, :, None] & ((s >= cols) & (s < cols + side))[:, None, :])
        window = window[:, None]                                                   # (n, 1, h, w)
        signs = self._signs((n, c, 1, 1), x, generator)
        for _ in range(self.resample):
            proposal = torch.where(window, torch.clamp(x + self.ball.eps * signs, 0.0, 1.0), current)
            unchanged = (proposal == current).flatten(1).all(1)
            if not bool(unchanged.any()):
                break
            signs = torch.where(unchanged[:, None, None, None], self._signs(signs.shape, x, generator), signs)
        return torch.where(window, torch.clamp(x + self.ball.eps * signs, 0.0, 1.0), current)

    @staticmethod
    def _signs(shape, x: Tensor, generator: torch.Generator) -> Tensor:
        bits = torch.randint(0, 2, tuple(shape), generator=generator, device=x.device)
        return (2 * bits - 1).to(x.dtype)


@ATTACKS.register("square")
def _square(eps: float, **kwargs) -> SquareLinf:
    return SquareLinf(eps=eps, **kwargs)
