"""Transfer attacks: adversarial examples crafted on a source model, classified by targets.

The black-box setting of the constant-perturbation paper (appendix A.1: each
of five models attacked with examples from the other four; Table 10: examples
from a standard and an adversarially trained model) and of Learn2Perturb
(Table 6).  Examples of one source are crafted once per batch
(:func:`craft_batches`) and then classified by every target
(:func:`classify_on_target`), so a source's attack cost does not grow with the
number of targets.  Crafting is seeded exactly like the white-box protocol
(:func:`robust.evaluation.protocol.evaluate_shard`) with the source's seed, so
the examples are the ones the source's own white-box rows were computed on;
a target's own noise is seeded by (target seed, batch position).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from robust.data.base import ImageSplit
from robust.device import prepare_input
from robust.evaluation.protocol import attack_for_model, is_stochastic, perturbation_norm, predict, within_cap
from robust.evaluation.suite import AttackSpec
from robust.seeding import derive_seed

TRANSFER_COLUMNS = ("example", "label", "prediction", "correct", "vote_prediction", "vote_correct",
                    "source_prediction", "source_correct", "eps", "distance", "stochastic")


@dataclass
class CraftedBatch:
    """One batch of a source's adversarial examples: per attack label, the rows it covers."""

    start: int                      # position of the batch's first example (seeds the target's noise)
    index: Tensor                   # (B,) stable example indices
    y: Tensor                       # (B,)
    keep: Dict[str, Tensor]         # label -> (B,) bool, the examples the attack covers (its own cap)
    x_adv: Dict[str, Tensor]        # label -> (keep.sum(), C, H, W)
    source_prediction: Dict[str, Tensor]  # label -> the source's prediction on x_adv (one draw)
    distance: Dict[str, Tensor]     # label -> ||x_adv - x|| in the attack's norm
    eps: Dict[str, float]


def craft_batches(source: nn.Module, split: ImageSplit, positions: Sequence[int], attacks: Sequence[AttackSpec],
                  eps_data: float, device: torch.device, seed: int, batch_size: int = 256) -> List[CraftedBatch]:
    """Adversarial examples of ``source`` for ``positions`` under every attack (independent protocol)."""
    source.eval()
    positions = list(positions)
    out = []
    for start in range(0, len(positions), batch_size):
        batch_seed = derive_seed(seed, positions[start])
        torch.manual_seed(batch_seed)  # the source's own noise, as in evaluate_shard
        x, y, index = split.batch(torch.as_tensor(positions[start:start + batch_size]))
        x, y = prepare_input(x, device), y.to(device)
        stochastic = is_stochastic(source, x)
        batch = CraftedBatch(positions[start], index, y, {}, {}, {}, {}, {})
        for i, spec in enumerate(attacks):
            spec = attack_for_model(spec, stochastic)
            keep = within_cap(spec.max_examples, positions[start:start + batch_size], y.device)
            x_adv = spec.build(eps_data, derive_seed(batch_seed, i))(source, x[keep], y[keep])
            label = attacks[i].label
            batch.keep[label], batch.x_adv[label], batch.eps[label] = keep, x_adv, spec.eps(eps_data)
            batch.source_prediction[label] = predict(source, x_adv, 1, stochastic)[0]
            batch.distance[label] = perturbation_norm(x_adv - x[keep], spec.norm)
        out.append(batch)
    return out


def classify_on_target(target: nn.Module, batches: Sequence[CraftedBatch], seed: int,
                       votes: int = 10) -> Dict[str, Dict[str, list]]:
    """The target's rows {label: columns of TRANSFER_COLUMNS} on a source's crafted examples."""
    target.eval()
    out: Dict[str, Dict[str, list]] = {}
    for batch in batches:
        for k, (label, x_adv) in enumerate(batch.x_adv.items()):
            torch.manual_seed(derive_seed(seed, batch.start, k))  # the target's own noise, if any
            stochastic = is_stochastic(target, x_adv) if len(x_adv) else False
            single, vote, _ = predict(target, x_adv, votes, stochastic)
            keep, y = batch.keep[label], batch.y[batch.keep[label]]
            cols = out.setdefault(label, {c: [] for c in TRANSFER_COLUMNS})
            n = len(y)
            cols["example"] += batch.index[keep.cpu()].tolist()
            cols["label"] += y.tolist()
            cols["prediction"] += single.tolist()
            cols["correct"] += (single == y).tolist()
            cols["vote_prediction"] += vote.tolist()
            cols["vote_correct"] += (vote == y).tolist()
            cols["source_prediction"] += batch.source_prediction[label].tolist()
            cols["source_correct"] += (batch.source_prediction[label] == y).tolist()
            cols["eps"] += [float(batch.eps[label])] * n
            cols["distance"] += batch.distance[label].tolist()
            cols["stochastic"] += [stochastic] * n
    return out
