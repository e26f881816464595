"""Per-example evaluation of a trained model under a list of attacks.

Every row is one (example, attack).  Predictions are recomputed from the
adversarial inputs after each attack returns, never carried over from inside
an attack.  Two protocols:

* independent: every attack runs on every example (Table 1 of the
  constant-perturbation paper reports each attack alone);
* cascade: each attack runs only on the examples that every earlier attack
  left correctly classified (AutoAttack's protocol, Croce & Hein 2020).

Either way ``robust`` is the running worst case: correct on the clean input
and under every attack so far.  Minimal-norm attacks (unbounded: CW, DeepFool,
growing FGSM, FAB-T-min) are outside it: they run on the examples correct
when clean under either protocol, their rows hold the prediction on the
closest adversarial point found and its ``distance`` (inf where none was
found), and their ``robust`` column is not carried to later attacks.  Stochastic models (repeated forward passes
differ) are detected; their accuracy is reported for a single draw
(``prediction``) and as a majority vote over ``votes`` draws
(``vote_prediction``), and their gradient attacks use EOT unless the attack
sets ``eot_samples`` itself.  Work is split into fixed shards of example
positions, and shards into batches; all randomness of a batch (attack starts,
EOT draws, the model's own noise) derives from (seed, position of the batch's
first example).  With the shard size a multiple of the batch size, sharding
never changes a batch: a retried shard reproduces its rows, and 1 worker, 8
workers or one unsharded pass give the same rows.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from robust.attacks.base import GradientAttack, cross_entropy
from robust.data.base import ImageSplit
from robust.device import prepare_input
from robust.evaluation.checks import LARGE_EPS
from robust.evaluation.suite import RAND_EOT_SAMPLES, AttackSpec
from robust.seeding import derive_seed

CLEAN = "clean"
LARGE_EPS_LABEL = "sanity-large-eps"
PROTOCOLS = ("independent", "cascade")
COLUMNS = ("example", "label", "prediction", "correct", "vote_prediction", "vote_correct",
           "attacked", "robust", "eps", "eot_samples", "stochastic", "zero_grad", "prob_like", "distance")


def shard_positions(n: int, shard_size: int) -> List[range]:
    """Fixed contiguous shards of ``range(n)``: the same for 1 worker or 8."""
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


@torch.no_grad()
def is_stochastic(model: nn.Module, x: Tensor, passes: int = 3) -> bool:
    """True when repeated eval-mode forward passes on the same input differ."""
    first = model(x)
    return any(not torch.equal(model(x), first) for _ in range(passes - 1))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, votes: int, stochastic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(single-draw prediction, majority vote over ``votes`` draws, logits of the first draw)."""
    logits = model(x)
    single = logits.argmax(1)
    if not stochastic or votes <= 1:
        return single, single, logits
    draws = torch.stack([single] + [model(x).argmax(1) for _ in range(votes - 1)])
    return single, torch.mode(draws, dim=0).values, logits


def attack_for_model(spec: AttackSpec, stochastic: bool) -> AttackSpec:
    """On a stochastic model a gradient attack without an explicit S gets EOT by default."""
    if stochastic and spec.gradient_based and "eot_samples" not in spec.params:
        return spec.with_params(eot_samples=RAND_EOT_SAMPLES)
    return spec


def perturbation_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-example size of ``delta`` in ``norm`` ('linf', 'l2', 'l1' or 'l0': pixels changed)."""
    flat = delta.detach().flatten(1).double()
    if norm == "linf":
        return flat.abs().amax(1)
    if norm == "l2":
        return flat.norm(dim=1)
    if norm == "l1":
        return flat.abs().sum(1)
    if norm == "l0":  # pixels (all channels of one location) that changed
        return (delta.detach().abs().amax(1).flatten(1) > 0).sum(1).double()
    raise ValueError(f"unknown norm {norm!r}; valid choices: linf, l2, l1, l0")


def _input_diagnostics(model: nn.Module, x: Tensor, y: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: is the input gradient exactly zero; do the outputs look like probabilities."""
    grad, _ = GradientAttack().loss_and_gradient(model, x, y, cross_entropy)
    zero_grad = grad.flatten(1).abs().amax(1) == 0
    prob_like = (logits.min(1).values >= 0) & (logits.max(1).values <= 1) & \
        ((logits.sum(1) - 1).abs() < 1e-4)
    return zero_grad, prob_like


def evaluate_shard(module: nn.Module, split: ImageSplit, positions: Sequence[int],
                   attacks: Sequence[AttackSpec], eps_data: float, device: torch.device,
                   seed: int, batch_size: int = 256, protocol: str = "independent",
                   votes: int = 10, large_eps_examples: int = 8,
                   progress: Optional[Callable[[int], None]] = None) -> Dict[str, Dict[str, list]]:
    """Evaluate ``positions`` of ``split`` clean and under each attack.

    Returns {label: columns} with the columns of :data:`COLUMNS` (lists of equal
    length), ``label`` being 'clean' or the attack's label.  The first
    ``large_eps_examples`` examples of every batch are also attacked with PGD
    at eps = 1 (label 'sanity-large-eps'), which must fool all of them
    (:func:`robust.evaluation.checks.large_eps_success`).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    module.eval()
    out: Dict[str, Dict[str, list]] = {label: {c: [] for c in COLUMNS}
                                       for label in [CLEAN] + [a.label for a in attacks]}
    if large_eps_examples > 0:
        out[LARGE_EPS_LABEL] = {c: [] for c in COLUMNS}
    positions = list(positions)
    for start in range(0, len(positions), batch_size):
        batch_seed = derive_seed(seed, positions[start])
        torch.manual_seed(batch_seed)  # the model's own noise, if any
        x, y, index = split.batch(torch.as_tensor(positions[start:start + batch_size]))
        x, y = prepare_input(x, device), y.to(device)
        stochastic = is_stochastic(module, x)
        single, vote, logits = predict(module, x, votes, stochastic)
        zero_grad, prob_like = _input_diagnostics(module, x, y, logits)
        robust = single == y
        clean_correct, worst_pred = robust.clone(), single.clone()
        _append(out[CLEAN], index, y, single, vote, torch.ones_like(robust), robust, 0.0, 0,
                stochastic, zero_grad, prob_like, torch.zeros(len(y)))
        for i, spec in enumerate(attacks):
            spec = attack_for_model(spec, stochastic)
            if spec.minimal_norm:  # unbounded: the examples correct when clean, whatever the protocol
                attacked = clean_correct.clone()
            else:
                attacked = robust.clone() if protocol == "cascade" else torch.ones_like(robust)
            keep = within_cap(spec.max_examples, positions[start:start + batch_size], y.device)
            attacked &= keep  # an attack's own cap: rows only for the first max_examples positions
            pred, vote = worst_pred.clone(), worst_pred.clone()
            distance = torch.full((len(y),), float("nan"), dtype=torch.float64, device=y.device)
            if bool(attacked.any()):
                attack = spec.build(eps_data, derive_seed(batch_seed, i))
                x_adv = attack(module, x[attacked], y[attacked])
                p_single, p_vote, _ = predict(module, x_adv, votes, stochastic)
                pred[attacked], vote[attacked] = p_single, p_vote
                distance[attacked] = perturbation_norm(x_adv - x[attacked], spec.norm)
            correct = pred == y
            row_robust = robust & correct
            if spec.minimal_norm:  # no adversarial point found: infinitely far; no worst-case update
                distance[attacked & correct] = float("inf")
            else:
                robust, worst_pred = row_robust, torch.where(correct, worst_pred, pred)
            _append(out[attacks[i].label], index[keep.cpu()], y[keep], pred[keep], vote[keep],
                    attacked[keep], row_robust[keep], spec.eps(eps_data), int(spec.params.get("eot_samples", 1)),
                    stochastic, zero_grad[keep], prob_like[keep], distance[keep])
        if large_eps_examples > 0:
            k = min(large_eps_examples, len(y))
            spec = attack_for_model(AttackSpec(LARGE_EPS_LABEL, "pgd", {"eps": LARGE_EPS, "steps": 20,
                                                                         "step_fraction": 0.25}), stochastic)
            x_adv = spec.build(eps_data, derive_seed(batch_seed, -1))(module, x[:k], y[:k])
            p_single, p_vote, _ = predict(module, x_adv, votes, stochastic)
            ones = torch.ones(k, dtype=torch.bool, device=y.device)
            _append(out[LARGE_EPS_LABEL], index[:k], y[:k], p_single, p_vote, ones, p_single == y[:k],
                    LARGE_EPS, int(spec.params.get("eot_samples", 1)), stochastic, zero_grad[:k],
                    prob_like[:k], perturbation_norm(x_adv - x[:k], spec.norm))
        if progress is not None:
            progress(len(y))
    return out


def within_cap(cap: Optional[int], positions: Sequence[int], device: torch.device) -> Tensor:
    """(B,) bool: which of the batch's positions an attack capped at ``cap`` examples covers."""
    if cap is None:
        return torch.ones(len(positions), dtype=torch.bool, device=device)
    return torch.as_tensor(list(positions), device=device) < cap


def _append(cols: Dict[str, list], index: Tensor, y: Tensor, pred: Tensor, vote: Tensor, attacked: Tensor,
            robust: Tensor, eps: float, eot_samples: int, stochastic: bool, zero_grad: Tensor,
            prob_like: Tensor, distance: Tensor) -> None:
    n = len(y)
    cols["example"] += index.tolist()
    cols["label"] += y.tolist()
    cols["prediction"] += pred.tolist()
    cols["correct"] += (pred == y).tolist()
    cols["vote_prediction"] += vote.tolist()
    cols["vote_correct"] += (vote == y).tolist()
    cols["attacked"] += attacked.tolist()
    cols["robust"] += robust.tolist()
    cols["eps"] += [float(eps)] * n
    cols["eot_samples"] += [eot_samples] * n
    cols["stochastic"] += [stochastic] * n
    cols["zero_grad"] += zero_grad.tolist()
    cols["prob_like"] += prob_like.tolist()
    cols["distance"] += distance.double().tolist()
