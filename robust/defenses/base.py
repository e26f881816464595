"""The defense interface that the single training loop consults.

The loop never asks which defense it runs.  It asks the defense to
  * ``prepare_model``: wrap or convert the model (noise modules, stochastic weights);
  * ``train_dataset``: transform the training split (constant perturbations);
  * ``loss``: supply the training loss of a batch (plain, adversarial, stability...);
  * ``param_groups``: split the parameters into groups with their own optimiser
    settings, updated in the listed order (alternating updates);
  * ``after_step``: act right after each optimiser step, gradients still in place
    (projections, clamping, update rules that are not gradient descent);
  * ``on_epoch_start`` / ``on_epoch_end``: react at epoch boundaries (schedules);
  * ``state_dict`` / ``load_state_dict``: the defense's own training state
    (counters, schedule positions), saved in every checkpoint so a resumed
    trial continues exactly;
  * ``validation_metrics``: add the selection metrics the defense is judged by
    (e.g. certified accuracy for additive-noise defenses), on the validation split;
  * ``deployed``: the classifier the defense deploys at test time around the trained
    network, which evaluation attacks and scores (an additive-noise defense's noisy
    classifier; the network itself otherwise).
Every hook has the behaviour of plain training by default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from robust.data.base import ImageSplit

#: The ``classifier`` value of rows that score the trained network without its deployment
#: (``launch/evaluate.py --classifier base``); deployed rows carry :func:`classifier_name`.
BASE = "base"
DEPLOYED = "deployed"


class BatchLoss(NamedTuple):
    """The loss to back-propagate and the logits on which training accuracy is counted."""

    loss: Tensor
    logits: Tensor


@dataclass
class TrainStep:
    """What the loop hands to ``Defense.loss`` for one batch.

    ``model`` is the model that takes the gradient step (possibly wrapped in
    DistributedDataParallel); ``module`` is the same network unwrapped, which
    attacks must use so that their extra backward passes do not trigger DDP's
    gradient all-reduce.  ``generator`` seeds any noise the loss draws.
    """

    model: nn.Module
    module: nn.Module
    x: Tensor
    y: Tensor
    index: Tensor
    epoch: int
    generator: torch.Generator


class Defense:
    """Plain training; subclasses override only the hooks their paper changes."""

    name = "defense"

    def __init__(self, config: Any) -> None:
        self.config = config

    def describe(self) -> Dict[str, Any]:
        """The resolved configuration, for manifests and result metadata."""
        return {"defense": self.name, **asdict(self.config)}

    def train_passes(self) -> float:
        """Forward+backward passes per training example and step, relative to plain
        training (1.0); used only for cost estimates (``launch/tune.py --dry-run``)."""
        return 1.0

    def check_train_config(self, train: Any) -> None:
        """Raise ValueError when the defense's settings cannot work with the run's
        :class:`robust.train.config.TrainConfig` (e.g. a warm-up not shorter than the run);
        called by the training loop before anything else and by ``launch/tune.py``."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def train_dataset(self, split: ImageSplit, seed: int) -> Dataset:
        return split

    def loss(self, step: TrainStep) -> BatchLoss:
        logits = step.model(step.x)
        return BatchLoss(F.cross_entropy(logits, step.y), logits)

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """Optimizer parameter groups; the default is one group of all parameters."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def after_step(self, module: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called after every optimiser step (``step`` counts steps from 1 over the whole
        run, across epochs and resumes); parameter gradients are still populated."""

    def state_dict(self) -> Dict[str, Any]:
        """The defense's mutable training state (not parameters: those live in the model)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def on_epoch_start(self, epoch: int, dataset: Dataset) -> None:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)

    def on_epoch_end(self, epoch: int, metrics: Dict[str, float]) -> Optional[Dict[str, float]]:
        """Return extra metrics to log for this epoch (e.g. learned noise scales)."""
        return None

    def validation_metrics(self, module: nn.Module, split: ImageSplit, device: torch.device,
                           seed: int) -> Dict[str, float]:
        """Extra selection metrics on the validation split (computed on every rank)."""
        return {}

    def deployed(self, model: nn.Module, noisy_copies: int = 1) -> nn.Module:
        """The classifier the defense deploys at test time, built around the trained ``model``.

        What every evaluation attack runs on and every verdict scores.  The model
        itself by default; an additive-noise defense returns its noisy classifier,
        ``noisy_copies`` being the n of STN's Algorithm 1 (ignored by the others).
        A deployed classifier may name itself through a ``classifier_name``
        attribute (:func:`classifier_name`).
        """
        return model


def classifier_name(deployed: nn.Module) -> str:
    """What the rows of a deployed classifier call it: its ``classifier_name`` attribute (e.g.
    'noisy(n=1,sigma=0.25,gaussian)'), else 'deployed' (the trained network is what is deployed)."""
    name = getattr(deployed, "classifier_name", None)
    return name if isinstance(name, str) else DEPLOYED
