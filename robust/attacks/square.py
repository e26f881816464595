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
  * the query budget includes the initial point of a run: ``queries`` = 1 +
    iterations; the query of the clean input (is it already misclassified?) comes
    on top, and ``attack.queries`` counts both (QueryAttack);
  * on a stochastic model (QueryAttack, the verdict's rule) each query is k =
    ``query_draws`` draws: the loss is the mean over the draws of the per-draw
    margin, an example is misclassified (already, or done) only where every draw
    misclassifies it, and a proposal is kept where it lowers the verdict's score
    (the fraction of the k draws correct), ties to the lower mean margin.  The
    current point is then always the best one seen by that rule.  The old
    ``eot_samples`` is a synonym of ``query_draws`` (AutoAttack's
    ``autoattack:eot_samples=20`` sets it on Square as on the gradient attacks).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from robust.attacks import ATTACKS
from robust.attacks.base import threat_model
from robust.attacks.verdict import better
from robust.attacks.queries import DEFAULT_QUERY_DRAWS, QueryAttack, check_positive_int, margin

#: Iterations (of a 10,000-query run) after which p halves (Andriushchenko et al. 2020).
HALVING_POINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init: float, iteration: int, queries: int) -> float:
    """p_i: the fraction of pixels in the window at ``iteration`` of a ``queries`` run."""
    rescaled = int(iteration / queries * 10000)
    return p_init / 2 ** sum(rescaled > point for point in HALVING_POINTS)


class SquareLinf(QueryAttack):
    """Score-based L-inf Square Attack (Andriushchenko et al. 2020, Algorithm 1 with 2).

    Args:
        eps: L-inf budget; queries: model queries per example and run (5,000, AutoAttack);
        p_init: initial fraction of pixels per square (0.8, AutoAttack's L-inf value);
        restarts: independent runs on the examples still not broken (1, AutoAttack);
        resample: tries to draw a proposal that changes the window;
        query_draws: k, draws per query on a stochastic model (None: QueryAttack's default);
        eot_samples: the former name of ``query_draws`` (give one of the two);
        seed: seeds the stripes, windows and signs; query_chunk: see QueryAttack.
    Shapes: x (N,C,H,W) in [0,1] with H, W >= 2, y (N,) -> x_adv like x inside the eps-ball.
    After a call ``queries`` (N,) holds the model input rows spent per example.
    Example: ``SquareLinf(eps=8/255, queries=5000)(model, x, y)``.
    """

    name = "square"

    def __init__(self, eps: float, queries: int = 5000, p_init: float = 0.8, restarts: int = 1,
                 resample: int = 10, query_draws: Optional[int] = None, eot_samples: Optional[int] = None,
                 seed: int = 0, query_chunk: Optional[int] = None) -> None:
        if None not in (query_draws, eot_samples) and query_draws != eot_samples:
            raise ValueError(f"square: eot_samples is the former name of query_draws; got both "
                             f"({eot_samples} and {query_draws}): give one")
        draws = next((v for v in (query_draws, eot_samples) if v is not None), DEFAULT_QUERY_DRAWS)
        super().__init__(query_chunk=query_chunk, query_draws=draws)
        self.ball = threat_model("linf", eps)
        self.budget = check_positive_int("queries", queries)
        self.restarts = check_positive_int("restarts", restarts)
        self.resample = check_positive_int("resample", resample, minimum=0)
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init}")
        self.p_init, self.seed = float(p_init), seed

    def evaluate(self, model: nn.Module, xs: Tensor, y: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        """(verdict score, margin loss) of queries xs, both (M,).

        The loss is z_y - max_{k != y} z_k, averaged over the k draws (< 0: misclassified
        on average).  The score is the fraction of the draws that classify xs correctly;
        on a deterministic model it is 1[margin >= 0] (the paper's stopping rule).
        """
        score, loss = self.query(model, xs, y, owner, margin)
        return ((loss >= 0).float() if not self.stochastic else score), loss

    def search(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if x.dim() != 4 or min(x.shape[2:]) < 2:
            raise ValueError(f"Square needs images (N, C, H, W) with H, W >= 2, got {tuple(x.shape)}")
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        x_adv = x.clone()
        everyone = torch.arange(len(x), device=x.device)
        score, loss = self.evaluate(model, x, y, everyone)
        for _ in range(self.restarts):
            todo = (score > 0).nonzero().squeeze(1)  # broken: every draw misclassifies
            if todo.numel() == 0:
                break
            x_run, score_run, loss_run = self._run(model, x[todo], y[todo], todo, generator)
            won = better(score_run, -loss_run, score[todo], -loss[todo])
            x_adv[todo[won]], score[todo[won]], loss[todo[won]] = x_run[won], score_run[won], loss_run[won]
        return x_adv

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, owner: Tensor,
             generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """One run of Algorithm 1 on x (n examples, ``owner`` their indices in the call's batch)."""
        n, c, h, w = x.shape
        eps = self.ball.eps
        stripes = self._signs((n, c, 1, w), x, generator)
        best = torch.clamp(x + eps * stripes, 0.0, 1.0)
        score, loss = self.evaluate(model, best, y, owner)
        for i in range(1, self.budget):
            active = (score > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            side = int(round(math.sqrt(square_fraction(self.p_init, i, self.budget) * h * w)))
            side = max(1, min(side, min(h, w) - 1))
            proposal = self._propose(x[active], best[active], side, generator)
            new_score, new_loss = self.evaluate(model, proposal, y[active], owner[active])
            # deterministic: score is 1[margin >= 0], so this is the paper's "lower margin"
            improved = better(new_score, -new_loss, score[active], -loss[active])
            kept = active[improved]
            best[kept], score[kept], loss[kept] = proposal[improved], new_score[improved], new_loss[improved]
        return best, score, loss

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
