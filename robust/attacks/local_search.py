"""LocalSearch (Narodytska & Kasiviswanathan 2017): greedy black-box local search over pixels.

"Simple black-box adversarial attacks on deep neural networks" (CVPR
workshops 2017), algorithm LocSearchAdv, the black-box attack of the SDR
paper (section 2.3, run there through Foolbox).  Pixel values are centred,
v = x - 0.5 in [-0.5, 0.5] (the paper's [LB, UB]).  Each round:

1. every candidate location (x, y) is probed: the current image with that
   pixel set to p * sign(v) in every channel, and scored by the model's
   probability of the true class.  As in the paper, probes only measure
   saliency and may leave the box (p = 10 puts a pixel far outside [0, 1]);
   the image the attack returns always lies in [0, 1];
2. the t locations whose probes lower that probability most are perturbed
   for good by the cyclic map v -> r * v, wrapped back into [LB, UB];
3. the search stops once the image is misclassified; otherwise the next
   candidates are the (2d+1) x (2d+1) neighbourhoods of the t locations.

The first candidates are a random 10% of the locations.  Defaults are those
of the SDR paper's tool (Foolbox): p = 10, r = 1.5, d = 5, t = 5, R = 150
rounds.  Only the model's outputs are queried.

On a stochastic model (QueryAttack, the verdict's rule) every probe and every
check of the current image is answered from k = ``query_draws`` draws: probes are
ranked by the mean true-class probability, the image is misclassified (already,
or done) only where every draw misclassifies it, and the attack returns the best
image it checked by the verdict's score (the fraction of the k draws correct),
ties to the lower mean true-class probability, since the greedy search does not
improve monotonically.  On a deterministic model it returns the last image, as
the paper's algorithm does.

Threat model: the paper's attack is unbounded in pixel values (norm 'l0': its
size is the number of pixels changed; eps = inf).  With ``norm='linf'`` and a
finite eps every probe and update is also projected into the L-inf eps-ball
around the clean image: a variant of ours, documented as such, that puts
LocalSearch in the same threat model as PGD so the two can be compared.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.attacks import ATTACKS, verdict
from robust.attacks.queries import DEFAULT_QUERY_DRAWS, QueryAttack, check_positive_int, true_class_probability

NORMS = ("l0", "linf")


class LocalSearch(QueryAttack):
    """Greedy local search over pixel locations, using output probabilities only.

    Args:
        eps: inf for the paper's unbounded attack (norm 'l0'), or the L-inf budget (norm 'linf').
        norm: 'l0' (paper) or 'linf' (ours: every change stays in the eps-ball).
        p: probe strength in centred units (10).
        r: cyclic perturbation factor, in [0, 2] (1.5).
        d: half width of the neighbourhood of a chosen location (5).
        t: locations perturbed per round (5).
        rounds: R, at most this many rounds (150).
        init_fraction: fraction of locations in the first candidate set (0.1).
        seed: seeds the first candidate set.  query_chunk, query_draws: see QueryAttack.
    Shapes: x (N,C,H,W) in [0,1], y (N,) -> x_adv like x.  After a call ``queries`` (N,)
    holds the model input rows spent per example.
    Example: ``LocalSearch()(model, x, y)``.
    """

    name = "local-search"

    def __init__(self, eps: float = math.inf, norm: str = "l0", p: float = 10.0, r: float = 1.5, d: int = 5,
                 t: int = 5, rounds: int = 150, init_fraction: float = 0.1, seed: int = 0,
                 query_chunk: Optional[int] = None, query_draws: int = DEFAULT_QUERY_DRAWS) -> None:
        super().__init__(query_chunk, query_draws)
        if norm not in NORMS:
            raise ValueError(f"local-search: unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
        if norm == "l0" and math.isfinite(eps):
            raise ValueError("local-search in norm 'l0' is the paper's unbounded attack: eps must be inf "
                             "(use norm 'linf' for a budget)")
        if norm == "linf" and not (0 < eps < math.inf):
            raise ValueError(f"local-search in norm 'linf' needs a finite eps > 0, got {eps}")
        if not 0 <= r <= 2:
            raise ValueError(f"local-search: r must be in [0, 2], got {r}")
        if not p > 0 or not 0 < init_fraction <= 1:
            raise ValueError(f"local-search: p must be > 0 and init_fraction in (0, 1], got {p}, {init_fraction}")
        self.eps, self.norm, self.p, self.r = float(eps), norm, float(p), float(r)
        self.d = check_positive_int("d", d, minimum=0)
        self.t = check_positive_int("t", t)
        self.rounds = check_positive_int("rounds", rounds)
        self.init_fraction, self.seed = float(init_fraction), seed

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        if self.norm == "linf":
            x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps)
        return x_adv.clamp(0.0, 1.0)

    def cyclic(self, v: Tensor) -> Tensor:
        """v -> r v, wrapped into [-0.5, 0.5] (the paper's CYCLIC with [LB, UB] = [-0.5, 0.5])."""
        v = self.r * v
        return torch.where(v < -0.5, v + 1.0, torch.where(v > 0.5, v - 1.0, v))

    def _probe_scores(self, model: nn.Module, x: Tensor, cur: Tensor, y: Tensor, candidates: Tensor,
                      owner: Tensor) -> Tensor:
        """True-class probability of each probe; +inf where a location is not a candidate. (B, H*W).

        ``owner`` (B,): the indices of the images in the call's batch."""
        b, c, h, w = cur.shape
        img, loc = candidates.nonzero(as_tuple=True)
        probes = cur[img].view(len(img), c, h * w).clone()
        v = probes.gather(2, loc[:, None, None].expand(-1, c, 1)) - 0.5
        probes.scatter_(2, loc[:, None, None].expand(-1, c, 1), 0.5 + self.p * v.sign())
        probes = probes.view(len(img), c, h, w)
        if self.norm == "linf":  # in the ball; the paper's probes (l0) may leave [0, 1]
            probes = self.project(probes, x[img])
        _, prob = self.query(model, probes, y[img], owner[img], true_class_probability)
        scores = torch.full((b, h * w), math.inf, device=cur.device)
        scores[img, loc] = prob
        return scores

    def search(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        b, c, h, w = x.shape
        cur = x.clone()
        n_init = max(1, round(self.init_fraction * h * w))
        keys = torch.rand((b, h * w), generator=generator, device=x.device)
        candidates = torch.zeros((b, h * w), dtype=torch.bool, device=x.device)
        candidates.scatter_(1, keys.topk(n_init, dim=1).indices, True)
        score, prob = self.query(model, x, y, torch.arange(b, device=x.device), true_class_probability)
        best, best_prob, best_score = x.clone(), prob, score
        active = score > 0  # broken: every draw misclassifies
        for _ in range(self.rounds):
            if not bool(active.any()):
                break
            idx = active.nonzero().squeeze(1)
            scores = self._probe_scores(model, x[idx], cur[idx], y[idx], candidates[idx], idx)
            k = min(self.t, h * w)
            chosen = torch.zeros_like(scores, dtype=torch.bool)
            top = scores.topk(k, dim=1, largest=False)
            chosen.scatter_(1, top.indices, torch.isfinite(top.values))  # only real candidates
            sub = cur[idx].view(len(idx), c, h * w)
            mask = chosen[:, None, :].expand_as(sub)
            sub = torch.where(mask, 0.5 + self.cyclic(sub - 0.5), sub)
            cur[idx] = self.project(sub.view(len(idx), c, h, w), x[idx])
            score, prob = self.query(model, cur[idx], y[idx], idx, true_class_probability)
            active[idx] = score > 0
            won = verdict.better(score, -prob, best_score[idx], -best_prob[idx])
            best[idx[won]], best_prob[idx[won]], best_score[idx[won]] = cur[idx[won]], prob[won], score[won]
            # next candidates: the (2d+1)^2 neighbourhoods of the chosen locations
            grown = F.max_pool2d(chosen.view(-1, 1, h, w).float(), 2 * self.d + 1, stride=1, padding=self.d)
            candidates[idx] = grown.view(len(idx), h * w) > 0
        return best if self.stochastic else cur


@ATTACKS.register("local-search")
def _local_search(eps: float, **kwargs) -> LocalSearch:
    return LocalSearch(eps=float(eps), **kwargs)
