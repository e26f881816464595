"""What black-box attacks share: they only query the model's outputs, and count the queries.

A :class:`QueryAttack` never asks for a gradient: every forward pass runs under
``torch.no_grad``, so it works on a model whose backward raises, or whose
gradients are masked (shattered, zero, or random).  Candidates are scored in
chunks of at most ``query_chunk`` inputs per forward pass (by default the
per-device chunk of :data:`robust.attacks.base.DEFAULT_EOT_CHUNK`: on CPU a few
dozen inputs per pass, on a GPU thousands).

Stochastic models (the verdict's rule, :mod:`robust.attacks.verdict`).  Each call
asks once whether the model is stochastic (:func:`~robust.attacks.verdict.is_stochastic`,
which does not move the random stream).  On a deterministic model a query is one
forward pass, exactly as in the attacks' papers.  On a stochastic model every query
of a point is answered from ``query_draws`` = k distinct draws
(:func:`~robust.attacks.verdict.draw_logits`), in :meth:`QueryAttack.query`:

* the attack's score of the point (margin, true-class probability) is the mean of
  the per-draw scores over the k draws: the Monte-Carlo estimate of the expected
  score that EOT optimises (Athalye et al. 2018);
* its decisions use the verdict's rule: a point is misclassified ("already
  broken", "success", "adversarial" for acceptance) only where *every* one of
  the k draws misclassifies it (:meth:`QueryAttack.broken`); the verdict's score of
  the point is the fraction of the k draws that classify it correctly, and among
  candidates the lower score wins, ties to the attack's own loss
  (:func:`~robust.attacks.verdict.better`).

With one draw a query of a point near the boundary of a randomized defense is a
coin flip: the attack stops on, accepts and returns points that a fresh draw
classifies correctly, which understates the attack (and hides masked gradients
from the black-box-stronger-than-white-box flag).

Queries are counted: after each call ``attack.queries`` is a LongTensor (N,) on
the inputs' device, the number of model input rows the attack spent on each
example (every query of every point derived from it, k per query on a stochastic
model).  The model-property probes (:func:`~robust.attacks.verdict.is_stochastic`
on the batch, and the one-off stacking probe of
:func:`~robust.attacks.verdict.stacking_gives_distinct_draws`) are not queries of
any example and are not counted.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from robust.attacks import verdict
from robust.attacks.base import Attack, LossFn, default_eot_chunk

#: k, the draws per query on a stochastic model.  Decision noise: under the every-draw
#: rule a point that one draw classifies correctly with probability q passes as broken
#: with probability (1 - q)^k; at k = 8 that is 0.4% for q = 0.5 and 17% for q = 0.2
#: (one draw: 50% and 80%).  Measured (benchmarks/bench_blackbox.py, BENCHMARKS.md; digits
#: small-cnn with Gaussian input noise 0.3, small budgets): the verdict's robust score
#: under Square, few-pixel, LocalSearch and Boundary falls from 0.81 / 0.80 / 0.83 / 0.72
#: at k = 1 to 0.75 / 0.65 / 0.79 / 0.65 at k = 8, about two thirds of the gain of k = 16
#: for half its queries.  Raise it (``square:query_draws=16``) where the budget allows.
DEFAULT_QUERY_DRAWS = 8


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


class QueryAttack(Attack):
    """Base class of score- and decision-based attacks.

    Subclasses implement ``search(model, x, y) -> x_adv`` and query the model only
    through :meth:`query` (or :meth:`broken`), passing for each queried row the index
    of the example (in ``x``) it belongs to, so that ``queries`` is exact.

    Args:
        query_chunk: at most this many inputs per forward pass; None chooses per device.
        query_draws: k, draws per query on a stochastic model (:data:`DEFAULT_QUERY_DRAWS`);
            1 decides from single noisy queries.  Deterministic models always use one pass.
    Attributes after a call: ``queries`` (N,) long, model input rows spent per example;
    ``stochastic``, whether the model was found stochastic.
    """

    def __init__(self, query_chunk: Optional[int] = None, query_draws: int = DEFAULT_QUERY_DRAWS) -> None:
        if query_chunk is not None and query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1 or None, got {query_chunk}")
        self.query_chunk = query_chunk
        self.query_draws = check_positive_int("query_draws", query_draws)
        self.queries: Optional[Tensor] = None
        self.stochastic = False
        self._count: Optional[Tensor] = None

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        self.stochastic = verdict.is_stochastic(model, x)
        self._count = torch.zeros(len(x), dtype=torch.long, device=x.device)
        try:
            x_adv = self.search(model, x, y)
            self.queries = self._count
        finally:
            self._count = None
        return x_adv

    def search(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def draws_per_query(self) -> int:
        """k for the model of the current call: ``query_draws`` if stochastic, else 1."""
        return self.query_draws if self.stochastic else 1

    @torch.no_grad()
    def query(self, model: nn.Module, xs: Tensor, y: Tensor, owner: Tensor,
              loss: Optional[LossFn] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Ask the model about the queries xs (M, C, H, W) with labels y (M,).

        Returns (the verdict's score: the fraction of the k draws whose top-1 class is y,
        0 meaning broken; the mean over the k draws of ``loss(logits (k, m, K), y) -> (k, m)``,
        or None), both (M,).  ``owner`` (M,) long: the example each query belongs to, charged
        k rows.  The queries go in chunks of ``query_chunk`` inputs; within a chunk the k
        copies are stacked where the model draws them independently
        (:func:`robust.attacks.verdict.draw_logits`).
        """
        k = self.draws_per_query
        chunk = self.query_chunk or default_eot_chunk(xs.device)
        if self._count is not None:  # None when a helper is called outside an attack call
            self._count.index_add_(0, owner, torch.full_like(owner, k))
        scores, losses = [], []
        for i in range(0, len(xs), chunk):
            logits, labels = verdict.draw_logits(model, xs[i:i + chunk], k, chunk).float(), y[i:i + chunk]
            scores.append(verdict.correct_fraction(logits, labels))
            if loss is not None:
                losses.append(loss(logits, labels).mean(0))
        return torch.cat(scores), (torch.cat(losses) if loss is not None else None)

    def broken(self, model: nn.Module, xs: Tensor, y: Tensor, owner: Tensor) -> Tensor:
        """Decision-only query under the verdict's rule: every one of the k draws has a
        top-1 label other than y (one pass on a deterministic model), (M,) bool."""
        return self.query(model, xs, y, owner)[0] == 0


def true_class_probability(logits: Tensor, y: Tensor) -> Tensor:
    """Softmax probability of the label per draw and query: logits (k, M, K), y (M,) -> (k, M)."""
    return logits.softmax(-1).gather(-1, y.expand(logits.shape[:-1])[..., None]).squeeze(-1)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j per draw and query: logits (..., M, K), y (M,) -> (..., M)."""
    index = y.expand(logits.shape[:-1])[..., None]
    z_y = logits.gather(-1, index).squeeze(-1)
    return z_y - logits.scatter(-1, index, float("-inf")).max(-1).values
