"""Per-example evaluation of a trained model under a list of attacks.

Every row is one (example, attack).  Predictions are recomputed from the
adversarial inputs after each attack returns, never carried over from inside
an attack.  Two protocols:

* independent: every attack runs on every example (Table 1 of the
  constant-perturbation paper reports each attack alone);
* cascade: each attack runs only on the examples that every earlier attack
  left unbroken (AutoAttack's protocol, Croce & Hein 2020), except the first
  ``check_examples`` of every batch, which every bounded attack attacks so
  that the sanity flags can compare attacks on the same examples.

The verdict (README, "Robust accuracy of stochastic models").  Each row is
judged on R = ``votes`` fresh draws of the model (R = 1 for a deterministic
model), drawn from a seeded stream of their own, independent of the attack's
EOT draws: the row stores the first draw's prediction (``prediction``,
``correct``), the majority vote (``vote_prediction``, ``vote_correct``) and
the counts (``draws`` = R, ``draws_correct`` = k), from which the summary
recomputes every rule.  The example's score under an attack is k / R; its
robust score is the minimum over clean and every bounded attack so far, and
``robust`` says whether that minimum is still above 0.  The cascade's rule,
stated once: an attack runs on the examples whose running minimum score is
above 0 (at least one draw still classified them correctly under every
earlier attack); an example at 0 cannot go lower.  Rows the cascade skipped
carry the prediction that broke the example and ``draws`` = 0.

Minimal-norm attacks (unbounded: CW, DeepFool, growing FGSM, FAB-T-min) are
outside the worst case: they run on the examples with a clean score above 0
under either protocol, their rows hold the verdict on the closest adversarial
point found and its ``distance`` (inf where none was found).  Gradient attacks
on a stochastic model use EOT unless the attack sets ``eot_samples`` itself;
each bounded one with S > 1 samples is run again with 2S samples on the first
``check_examples`` examples of every batch (label ``sanity-eot-2x:<label>``),
the input of the "EOT not converged" flag.  Work is split into fixed shards
of example positions, and shards into batches; all randomness of a batch
(attack starts, EOT draws, the model's own noise, the verdict's draws)
derives from (seed, position of the batch's first example).  With the shard
size a multiple of the batch size, sharding never changes a batch: a retried
shard reproduces its rows, and 1 worker, 8 workers or one unsharded pass give
the same rows.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from robust.attacks import verdict
from robust.attacks.base import GradientAttack, default_eot_chunk
from robust.data.base import ImageSplit
from robust.device import prepare_input
from robust.evaluation.checks import LARGE_EPS
from robust.evaluation.suite import RAND_EOT_SAMPLES, AttackSpec
from robust.seeding import derive_seed

CLEAN = "clean"
LARGE_EPS_LABEL = "sanity-large-eps"
EOT_CHECK_PREFIX = "sanity-eot-2x:"
PROTOCOLS = ("independent", "cascade")
COLUMNS = ("example", "label", "prediction", "correct", "vote_prediction", "vote_correct",
           "attacked", "robust", "eps", "eot_samples", "stochastic", "zero_grad", "prob_like", "distance",
           "draws", "draws_correct", "queries", "check")
#: Stream tags of the verdict's draws, apart from every attack's (derive_seed coordinates).
_VERDICT_STREAM = 0x7E4D1C7


def shard_positions(n: int, shard_size: int) -> List[range]:
    """Fixed contiguous shards of ``range(n)``: the same for 1 worker or 8."""
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


is_stochastic = verdict.is_stochastic


class Verdict(NamedTuple):
    """The verdict on a batch: first draw's prediction, majority vote, correct draws k of R."""

    single: Tensor
    vote: Tensor
    correct: Tensor
    draws: int
    logits: Tensor   # the first draw's logits


@torch.no_grad()
def judge(model: nn.Module, x: Tensor, y: Tensor, votes: int, stochastic: bool, seed: Optional[int]) -> Verdict:
    """R = ``votes`` fresh draws of a stochastic model (1 of a deterministic one) on ``x``.

    The draws come from torch's RNG seeded with ``seed`` inside a private copy of the
    RNG state, so they are independent of the attacks' draws and leave the stream the
    attacks use where it was (``seed`` None: from the current stream).  Copies are
    stacked into one pass only where the model gives stacked copies distinct draws.
    """
    if not stochastic or votes <= 1:
        logits = model(x)
        single = logits.argmax(1)
        return Verdict(single, single, (single == y).long(), 1, logits)
    if seed is None:
        logits = verdict.draw_logits(model, x, votes, default_eot_chunk(x.device))
    else:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            logits = verdict.draw_logits(model, x, votes, default_eot_chunk(x.device))
    draws = logits.argmax(-1)                                   # (R, N)
    vote = torch.mode(draws, dim=0).values
    return Verdict(draws[0], vote, (draws == y[None]).sum(0), votes, logits[0])


def predict(model: nn.Module, x: Tensor, votes: int, stochastic: bool, seed: Optional[int] = None
            ) -> tuple[Tensor, Tensor, Tensor]:
    """(first draw's prediction, majority vote over ``votes`` draws, first draw's logits)."""
    v = judge(model, x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), votes, stochastic, seed)
    return v.single, v.vote, v.logits


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


def logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{i != y} z_i - z_y per example (N,): a margin loss whose gradient does not
    underflow on confident examples the way cross-entropy's does in float32."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return logits.scatter(1, y[:, None], float("-inf")).max(1).values - z_y


def _input_diagnostics(model: nn.Module, x: Tensor, y: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: is the input gradient of the logit margin exactly zero; do the outputs
    look like probabilities."""
    grad, _ = GradientAttack().loss_and_gradient(model, x, y, logit_margin)
    zero_grad = grad.flatten(1).abs().amax(1) == 0
    prob_like = (logits.min(1).values >= 0) & (logits.max(1).values <= 1) & \
        ((logits.sum(1) - 1).abs() < 1e-4)
    return zero_grad, prob_like


class _Batch(NamedTuple):
    x: Tensor
    y: Tensor
    index: Tensor
    positions: List[int]
    seed: int
    stochastic: bool
    votes: int


def evaluate_shard(module: nn.Module, split: ImageSplit, positions: Sequence[int],
                   attacks: Sequence[AttackSpec], eps_data: float, device: torch.device,
                   seed: int, batch_size: int = 256, protocol: str = "independent",
                   votes: int = 10, large_eps_examples: int = 8, check_examples: int = 16,
                   progress: Optional[Callable[[int], None]] = None) -> Dict[str, Dict[str, list]]:
    """Evaluate ``positions`` of ``split`` clean and under each attack.

    Returns {label: columns} with the columns of :data:`COLUMNS` (lists of equal
    length), ``label`` being 'clean', the attack's label, or a sanity label.  The
    first ``large_eps_examples`` examples of every batch are also attacked with PGD
    at eps = 1 (label 'sanity-large-eps'), which must fool all of them
    (:func:`robust.evaluation.checks.large_eps_success`).  ``votes`` is R, the
    verdict's draws of a stochastic model; ``check_examples`` the size of the
    per-batch subset of the cascade's same-example checks and of the EOT check.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    module.eval()
    out: Dict[str, Dict[str, list]] = {}
    positions = list(positions)
    for start in range(0, len(positions), batch_size):
        batch_seed = derive_seed(seed, positions[start])
        torch.manual_seed(batch_seed)  # the model's own noise, if any
        x, y, index = split.batch(torch.as_tensor(positions[start:start + batch_size]))
        x, y = prepare_input(x, device), y.to(device)
        batch = _Batch(x, y, index, positions[start:start + batch_size], batch_seed,
                       is_stochastic(module, x), votes)
        diagnostics = _evaluate_batch(module, batch, attacks, eps_data, protocol, check_examples, out)
        if large_eps_examples > 0:
            _large_eps_rows(module, batch, min(large_eps_examples, len(y)), eps_data, diagnostics, out)
        if progress is not None:
            progress(len(y))
    return out


def _evaluate_batch(module: nn.Module, b: _Batch, attacks: Sequence[AttackSpec], eps_data: float,
                    protocol: str, check_examples: int, out: Dict[str, Dict[str, list]]) -> tuple[Tensor, Tensor]:
    """Clean rows, then every attack's rows, of one batch (see the module docstring);
    returns the clean inputs' diagnostics (zero margin gradient, probability-like outputs)."""
    x, y = b.x, b.y
    clean = judge(module, x, y, b.votes, b.stochastic, derive_seed(b.seed, _VERDICT_STREAM, 0))
    zero_grad, prob_like = _input_diagnostics(module, x, y, clean.logits)
    clean_score = clean.correct.double() / clean.draws
    run_min = clean_score.clone()          # the running robust score: min over clean and attacks
    worst_pred = clean.single.clone()
    ones = torch.ones_like(y, dtype=torch.bool)
    check = torch.arange(len(y), device=y.device) < check_examples
    # rows say which examples every bounded attack attacked whatever the others did (the flags
    # compare attacks there): all under the independent protocol, the check subset in a cascade
    same = check if protocol == "cascade" else ones
    _append(out, CLEAN, b.index, y, clean.single, clean.vote, ones, run_min > 0, 0.0, 0, b.stochastic,
            zero_grad, prob_like, torch.zeros(len(y)), torch.full_like(y, clean.draws), clean.correct, None, same)
    for i, spec in enumerate(attacks):
        spec = attack_for_model(spec, b.stochastic)
        if spec.minimal_norm:  # unbounded: the examples with a clean score above 0, whatever the protocol
            attacked = clean_score > 0
        elif protocol == "cascade":
            attacked = (run_min > 0) | check
        else:
            attacked = ones.clone()
        keep = within_cap(spec.max_examples, b.positions, y.device)
        attacked &= keep  # an attack's own cap: rows only for the first max_examples positions
        rows = _attack_rows(module, b, spec, i, attacked, worst_pred, eps_data)
        pred, vote, k, draws, distance, queries = rows
        # a row not attacked keeps the running score (a cascade skips only examples at 0; an
        # attack's own cap leaves the examples beyond it as they were)
        score = torch.where(draws > 0, k.double() / draws.clamp_min(1), run_min)
        correct = pred == y
        if spec.minimal_norm:  # no adversarial point found: infinitely far; no worst-case update
            # adversarial = the verdict's majority misclassifies (score < 1/2; deterministic: wrong)
            row_robust = torch.minimum(run_min, score) > 0
            distance[attacked & (score >= 0.5)] = float("inf")
        else:
            run_min = torch.minimum(run_min, score)
            row_robust = run_min > 0
            worst_pred = torch.where(correct, worst_pred, pred)
        _append(out, attacks[i].label, b.index[keep.cpu()], y[keep], pred[keep], vote[keep], attacked[keep],
                row_robust[keep], spec.eps(eps_data), int(spec.params.get("eot_samples", 1)), b.stochastic,
                zero_grad[keep], prob_like[keep], distance[keep], draws[keep], k[keep],
                None if queries is None else queries[keep], same[keep])
        eot = int(spec.params.get("eot_samples", 1))
        if b.stochastic and spec.gradient_based and not spec.minimal_norm and eot > 1 and check_examples > 0:
            _eot_check_rows(module, b, spec.with_params(eot_samples=2 * eot), i, check & keep,
                            attacks[i].label, eps_data, zero_grad, prob_like, out)
    return zero_grad, prob_like


def _attack_rows(module: nn.Module, b: _Batch, spec: AttackSpec, i: int, attacked: Tensor,
                 worst_pred: Tensor, eps_data: float):
    """Run one attack on the ``attacked`` examples of the batch and judge its points.
    Rows not attacked keep ``worst_pred`` and get draws = 0."""
    y = b.y
    pred, vote = worst_pred.clone(), worst_pred.clone()
    k = torch.zeros_like(y)
    draws = torch.zeros_like(y)
    distance = torch.full((len(y),), float("nan"), dtype=torch.float64, device=y.device)
    queries = None
    if bool(attacked.any()):
        attack = spec.build(eps_data, derive_seed(b.seed, i))
        x_adv = attack(module, b.x[attacked], y[attacked])
        v = judge(module, x_adv, y[attacked], b.votes, b.stochastic, derive_seed(b.seed, _VERDICT_STREAM, i + 1))
        pred[attacked], vote[attacked], k[attacked], draws[attacked] = v.single, v.vote, v.correct, v.draws
        distance[attacked] = perturbation_norm(x_adv - b.x[attacked], spec.norm)
        counted = getattr(attack, "queries", None)
        if isinstance(counted, Tensor) and counted.shape[0] == int(attacked.sum()):
            queries = torch.full_like(y, -1)
            queries[attacked] = counted.to(y.device).long()
    return pred, vote, k, draws, distance, queries


def _eot_check_rows(module: nn.Module, b: _Batch, spec: AttackSpec, i: int, subset: Tensor, label: str,
                    eps_data: float, zero_grad: Tensor, prob_like: Tensor,
                    out: Dict[str, Dict[str, list]]) -> None:
    """The attack again with 2S EOT samples on ``subset`` (same start seed), for the
    "EOT not converged" flag; rows labelled ``sanity-eot-2x:<label>``."""
    if not bool(subset.any()):
        return
    none = torch.full_like(b.y, -1)
    pred, vote, k, draws, distance, _ = _attack_rows(module, b, spec, i, subset, none, eps_data)
    s = subset
    _append(out, EOT_CHECK_PREFIX + label, b.index[s.cpu()], b.y[s], pred[s], vote[s], s[s],
            k[s] > 0, spec.eps(eps_data), int(spec.params["eot_samples"]), b.stochastic, zero_grad[s],
            prob_like[s], distance[s], draws[s], k[s], None, s[s])


def _large_eps_rows(module: nn.Module, b: _Batch, k: int, eps_data: float, diagnostics: tuple[Tensor, Tensor],
                    out: Dict[str, Dict[str, list]]) -> None:
    """PGD at eps = 1 on the first ``k`` examples: it must fool (about) all of them."""
    spec = attack_for_model(AttackSpec(LARGE_EPS_LABEL, "pgd", {"eps": LARGE_EPS, "steps": 20,
                                                                 "step_fraction": 0.25}), b.stochastic)
    x_adv = spec.build(eps_data, derive_seed(b.seed, -1))(module, b.x[:k], b.y[:k])
    v = judge(module, x_adv, b.y[:k], b.votes, b.stochastic, derive_seed(b.seed, _VERDICT_STREAM, -1))
    ones = torch.ones(k, dtype=torch.bool, device=b.y.device)
    _append(out, LARGE_EPS_LABEL, b.index[:k], b.y[:k], v.single, v.vote, ones, v.correct > 0, LARGE_EPS,
            int(spec.params.get("eot_samples", 1)), b.stochastic, diagnostics[0][:k],
            diagnostics[1][:k], perturbation_norm(x_adv - b.x[:k], spec.norm),
            torch.full((k,), v.draws, dtype=torch.long, device=b.y.device), v.correct, None, None)


def within_cap(cap: Optional[int], positions: Sequence[int], device: torch.device) -> Tensor:
    """(B,) bool: which of the batch's positions an attack capped at ``cap`` examples covers."""
    if cap is None:
        return torch.ones(len(positions), dtype=torch.bool, device=device)
    return torch.as_tensor(list(positions), device=device) < cap


def _append(out: Dict[str, Dict[str, list]], label: str, index: Tensor, y: Tensor, pred: Tensor, vote: Tensor,
            attacked: Tensor, robust: Tensor, eps: float, eot_samples: int, stochastic: bool, zero_grad: Tensor,
            prob_like: Tensor, distance: Tensor, draws: Tensor, draws_correct: Tensor,
            queries: Optional[Tensor], check: Optional[Tensor]) -> None:
    cols = out.setdefault(label, {c: [] for c in COLUMNS})
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
    cols["draws"] += draws.long().tolist()
    cols["draws_correct"] += draws_correct.long().tolist()
    cols["queries"] += [None] * n if queries is None else [None if q < 0 else q for q in queries.tolist()]
    cols["check"] += [None] * n if check is None else check.tolist()
