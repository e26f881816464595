"""Our `apgd-rand` against a reference implementation of the rand protocol (torchattacks).

Shared by ``tests/test_reference_rand.py`` (CI, at most 64 examples) and
``benchmarks/bench_rand_reference.py`` (the full comparison and the timings).

The rand protocol (Croce & Hein 2020, section 5: AutoAttack's version for
randomized defenses): APGD-CE and APGD-DLR, one restart, 100 steps, the gradient
averaged over S = 20 stochastic passes (EOT).  Ours is built as the evaluation
builds it (``parse_attack("apgd-rand")`` and the protocol's seeding); the
reference is torchattacks 3.5.1's ``APGD`` with ``loss`` 'ce' and 'dlr',
``eot_iter`` = S, ``n_restarts`` = 1 and the same eps, steps and norm (Linf).
The reference is only called, never copied.

Both sides' points are judged by the same rule on the same draws: the verdict
(:func:`robust.evaluation.protocol.judge`) on R fresh draws from a seeded stream
of its own, with one seed per role (clean inputs, APGD-CE points, APGD-DLR
points) shared by the two sides.  An example's score under an attack is k / R;
its robust score is the minimum over clean, APGD-CE and APGD-DLR (the worse of
the two attacks, clean correctness included); robust accuracy is the mean of
that score.  Ours is "at least as strong" when the 95% interval of the mean
paired difference (ours - reference, per example) does not lie above 0.  The
interval (percentile bootstrap over examples) treats examples as independent;
under PNI one weight draw serves a whole batch, so there it is too narrow,
which makes the check stricter on ours, not looser.

Module-level imports are APIs that exist before and after issue 14, so the
benchmark's "before" subprocess builds the same models from this file.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from robust.data.base import DatasetSplits
from robust.defenses import create_defense
from robust.evaluation.suite import parse_attack
from robust.models import create_model
from robust.seeding import derive_seed
from robust.train import TrainConfig, fit

#: The reference implementation's version this comparison was written against.
REFERENCE_VERSION = "3.5.1"
#: Input noise of the external model (``helpers.NoisyInput``, noise per example and per pass):
#: large enough that an attack without EOT is misled, small enough that clean accuracy stays
#: meaningful on digits (8x8, pixels in [0, 1]).
INPUT_NOISE_SIGMA = 0.3
#: Verdict stream tags, one per role: clean inputs, APGD-CE points, APGD-DLR points.
VERDICT_STREAMS = (0x5EED0, 0x5EED1, 0x5EED2)


def small_cnn(splits: DatasetSplits, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("small-cnn", num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size, mean=splits.mean, std=splits.std)


def train_config(epochs: int) -> TrainConfig:
    """Adam at 2e-3, cosine schedule; the validation PGD only at the last epoch."""
    return TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0,
                       schedule="cosine", val_attack_steps=3, val_attack_every=epochs)


def pni_defense(splits: DatasetSplits, train_steps: int = 3):
    """PNI-W at the dataset's eps; a short training PGD and a tiny selection metric (the
    evaluation is under test here, not the training)."""
    return create_defense("pni", eps_data=splits.eps, steps=train_steps, val_examples=32,
                          val_eot_steps=2, val_eot_samples=2)


def train_standard(splits: DatasetSplits, epochs: int, seed: int = 0) -> nn.Module:
    """small-cnn with plain training: deterministic."""
    module, _ = fit(small_cnn(splits, seed), create_defense("standard", eps_data=splits.eps), splits,
                    train_config(epochs), seed=seed, device=torch.device("cpu"))
    return module.eval()


def train_pni(splits: DatasetSplits, epochs: int, seed: int = 0, init: Optional[nn.Module] = None,
              train_steps: int = 3) -> nn.Module:
    """small-cnn made noisy by PNI-W (a weight draw per pass, shared by the pass's examples)
    and trained with it, from a copy of ``init``'s weights when given."""
    model = copy.deepcopy(init) if init is not None else small_cnn(splits, seed)
    module, _ = fit(model, pni_defense(splits, train_steps), splits, train_config(epochs), seed=seed,
                    device=torch.device("cpu"))
    return module.eval()


def ours_rand(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int,
              steps: int = 100, eot_samples: int = 20) -> List[Tensor]:
    """Our APGD-CE and APGD-DLR points: the attacks of ``parse_attack('apgd-rand')``, with the
    EOT default of the protocol on a stochastic model, seeded as the protocol seeds a batch
    (``steps``/``eot_samples`` override both attacks)."""
    from robust.evaluation.protocol import attack_for_model, is_stochastic

    torch.manual_seed(seed)  # the model's own noise
    stochastic = is_stochastic(model, x)
    points = []
    for i, spec in enumerate(parse_attack("apgd-rand")):
        spec = attack_for_model(spec.with_params(steps=steps, eot_samples=eot_samples), stochastic)
        points.append(spec.build(eps, derive_seed(seed, i))(model, x, y))
    return points


def reference_rand(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int,
                   steps: int = 100, eot_samples: int = 20) -> List[Tensor]:
    """torchattacks' APGD-CE and APGD-DLR points (Linf, 1 restart, EOT over ``eot_samples``).
    Like AutoAttack it attacks the examples one clean pass classifies correctly and returns
    the first iterate one pass misclassified, else the clean input."""
    import torchattacks

    return [torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed,
                              loss=loss, eot_iter=eot_samples)(x, y).detach() for loss in ("ce", "dlr")]


def robust_scores(model: nn.Module, x: Tensor, y: Tensor, points: List[Tensor], votes: int,
                  seed: int) -> Tensor:
    """Per example (N,): min of k / R over the clean inputs and each point set, every set judged
    on R = ``votes`` draws of the verdict's stream for its role (:data:`VERDICT_STREAMS`)."""
    from robust.evaluation.protocol import is_stochastic, judge

    stochastic = is_stochastic(model, x)
    scores = []
    for stream, inputs in zip(VERDICT_STREAMS, [x, *points]):
        v = judge(model, inputs, y, votes, stochastic, derive_seed(seed, stream))
        scores.append(v.correct.double() / v.draws)
    return torch.stack(scores).min(0).values


@dataclass
class Side:
    """One implementation's outcome: its points (APGD-CE, APGD-DLR), the per-example robust
    scores, and the wall time of its two attacks."""

    points: List[Tensor]
    scores: Tensor
    seconds: float

    @property
    def accuracy(self) -> float:
        return float(self.scores.mean())

    def interval(self) -> Tuple[float, float]:
        """95% percentile-bootstrap interval of the robust accuracy."""
        from robust.evaluation.stats import bootstrap_interval

        return bootstrap_interval(self.scores.tolist())


@dataclass
class Comparison:
    """Ours against the reference on the same examples, judged on the same draws."""

    ours: Side
    reference: Side
    clean_scores: Tensor

    @property
    def clean(self) -> float:
        return float(self.clean_scores.mean())

    def difference_interval(self) -> Tuple[float, float]:
        """95% percentile-bootstrap interval of the mean paired difference, ours - reference."""
        from robust.evaluation.stats import bootstrap_interval

        return bootstrap_interval((self.ours.scores - self.reference.scores).tolist())

    @property
    def ours_at_least_as_strong(self) -> bool:
        """Our robust accuracy is not above the reference's beyond the interval."""
        return self.difference_interval()[0] <= 0.0

    def with_ours(self, side: Side) -> "Comparison":
        return replace(self, ours=side)


def run_side(attack, model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int, votes: int,
             steps: int, eot_samples: int) -> Side:
    """Time ``attack`` (:func:`ours_rand` or :func:`reference_rand`) and judge its points; the
    global RNG is restored afterwards (torchattacks reseeds it)."""
    with torch.random.fork_rng():
        start = time.perf_counter()
        points = attack(model, x, y, eps, seed, steps, eot_samples)
        seconds = time.perf_counter() - start
        return Side(points, robust_scores(model, x, y, points, votes, seed), seconds)


def compare(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int = 0, votes: int = 20,
            steps: int = 100, eot_samples: int = 20) -> Comparison:
    """Both sides on (x, y) with the same eps, steps, S and seed, judged on the same draws."""
    ours = run_side(ours_rand, model, x, y, eps, seed, votes, steps, eot_samples)
    reference = run_side(reference_rand, model, x, y, eps, seed, votes, steps, eot_samples)
    with torch.random.fork_rng():
        clean = robust_scores(model, x, y, [], votes, seed)
    return Comparison(ours, reference, clean)
