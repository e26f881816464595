"""The verdict on a stochastic model, and how draws are taken from it.

A randomized defense is a distribution of classifiers.  Its robust accuracy is
defined once (README, "Robust accuracy of stochastic models"): per example, the
fraction of R fresh draws of the model that classify the input correctly, clean
and under each attack; the example's robust score is the minimum over clean and
every attack.  A deterministic model is the special case R = 1.

Attacks use the same rule for their own decisions ("already broken", "stop",
which restart or iterate to return), on the attack's own draws: on a
stochastic model, a point is broken only where *every* draw misclassifies it
(score 0), and among candidate points the one with the lowest score wins (ties:
the higher loss).  Deterministic models keep the first-misclassified-point
rules of the original algorithms.

Draws are only useful when they are distinct.  Stacking S copies of a batch
into one forward pass gives S independent draws only when the model draws its
noise per example; a model that draws once per forward call (stochastic
weights sampled per batch, PNI's weight noise, an external model) would give
every copy the same draw.  :func:`stacking_gives_distinct_draws` finds out
which, for any model, by comparing the spread of identical inputs within one
pass with their spread across passes; everything that stacks copies asks it.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn

#: Identical inputs probed per pass by :func:`stacking_gives_distinct_draws`.
PROBE_COPIES = 16
#: Within-pass spread below this fraction of the across-pass spread means the copies of
#: one pass (partly) share their draw.  For independent draws the ratio of the two
#: variance estimates (15 and 15 degrees of freedom per logit, summed over the logits)
#: falls below 0.5 with probability well under 1%; a false alarm only costs speed (one
#: copy per pass), a miss would cost correctness, so the threshold leans to alarms.
SHARED_RATIO = 0.5

_distinct_cache: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _rng_devices(x: Tensor) -> list:
    return [x.device] if x.device.type == "cuda" else []


@torch.no_grad()
def is_stochastic(model: nn.Module, x: Tensor, passes: int = 3) -> bool:
    """True when repeated forward passes on the same input differ (eval mode as given).

    The passes draw from a private copy of the RNG state, so asking does not move the
    model's random stream (a retried shard reproduces its rows).
    """
    with torch.random.fork_rng(devices=_rng_devices(x)):
        first = model(x)
        return any(not torch.equal(model(x), first) for _ in range(passes - 1))


@torch.no_grad()
def stacking_gives_distinct_draws(model: nn.Module, x: Tensor) -> bool:
    """Whether identical inputs stacked into one forward pass get independent draws.

    One pass over ``PROBE_COPIES`` copies of ``x[:1]`` against as many separate passes
    over ``x[:1]``: a deterministic model trivially qualifies; a stochastic one qualifies
    when no two stacked copies give identical outputs and their spread is not clearly
    below the spread across passes (:data:`SHARED_RATIO`).  Detected per model object and
    cached; the probe draws from a private copy of the RNG state.
    """
    cached = _distinct_cache.get(model) if _cacheable(model) else None
    if cached is not None:
        return cached
    one = x[:1].detach()
    with torch.random.fork_rng(devices=_rng_devices(x)):
        torch.manual_seed(0x5EED)
        across = torch.cat([model(one).float() for _ in range(PROBE_COPIES)])
        within = model(one.expand(PROBE_COPIES, *one.shape[1:]).contiguous()).float()
    spread_across = across.var(0).sum()
    if spread_across == 0:
        distinct = True  # deterministic: stacking cannot share what is not drawn
    else:
        repeated = (within[:, None, :] == within[None, :, :]).all(-1)
        repeated.fill_diagonal_(False)
        distinct = not bool(repeated.any()) and bool(within.var(0).sum() >= SHARED_RATIO * spread_across)
    if _cacheable(model):
        _distinct_cache[model] = distinct
    return distinct


def _cacheable(model: nn.Module) -> bool:
    try:
        weakref.ref(model)
        return True
    except TypeError:
        return False


def copies_per_pass(model: nn.Module, x: Tensor, wanted: int, chunk: int) -> int:
    """How many copies of the batch ``x`` one forward pass may stack: up to ``wanted``
    within ``chunk`` inputs per pass, and 1 where stacked copies would share a draw."""
    copies = max(1, min(wanted, chunk // max(x.shape[0], 1)))
    if copies > 1 and getattr(model, "noise_shared_in_batch", False):
        return 1
    if copies > 1 and not stacking_gives_distinct_draws(model, x):
        return 1
    return copies


def draw_logits(model: nn.Module, x: Tensor, draws: int, chunk: int,
                forward: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Logits of ``draws`` distinct draws of the model on ``x``: (draws, N, K).

    Copies are stacked per :func:`copies_per_pass`; ``forward`` (default ``model``) is
    what is called on each stacked batch.
    """
    forward = forward or model
    n, out, remaining = x.shape[0], [], draws
    per_pass = copies_per_pass(model, x, draws, chunk)
    while remaining > 0:
        copies = min(per_pass, remaining)
        xs = torch.cat([x] * copies) if copies > 1 else x
        out.append(forward(xs).view(copies, n, -1))
        remaining -= copies
    return torch.cat(out)


def correct_fraction(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of draws whose top-1 class is y: logits (S, N, K), y (N,) -> (N,) float."""
    return (logits.argmax(-1) == y[None]).float().mean(0)


def better(score: Tensor, loss: Tensor, best_score: Tensor, best_loss: Tensor) -> Tensor:
    """Where a candidate beats the best so far under the verdict's rule: a lower score
    (fraction of draws correct), on ties a higher loss.  (N,) bool."""
    return (score < best_score) | ((score == best_score) & (loss > best_loss))
