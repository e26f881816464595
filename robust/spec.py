"""A trial's resolved configuration, and how to build its parts from it.

``TrialSpec`` is plain data (it travels through Ray Tune as a dict and is
stored in the trials table); :func:`build_trial` turns it into the dataset
splits, model, defense and training configuration.  Nothing here knows which
process or node it runs on.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional

import torch
from torch import nn

from robust.data import create_dataset
from robust.data.base import DatasetSplits
from robust.defenses import create_defense
from robust.defenses.base import Defense
from robust.models import create_model
from robust.train.config import TrainConfig


@dataclass
class TrialSpec:
    """Everything that determines one trial: what to train, how, with which seed, how to evaluate.

    ``attacks``: evaluation attack names (see :mod:`robust.evaluation.suite`),
    at the dataset's eps_data unless a name overrides it.  ``max_test_examples`` bounds the
    test evaluation (None: the whole test split).
    """

    defense: str
    dataset: str
    model: str
    seed: int = 0
    defense_config: Dict[str, Any] = field(default_factory=dict)
    dataset_config: Dict[str, Any] = field(default_factory=dict)
    model_config: Dict[str, Any] = field(default_factory=dict)
    train: Dict[str, Any] = field(default_factory=dict)
    attacks: List[str] = field(default_factory=list)
    max_test_examples: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrialSpec":
        return cls(**data)

    def config_id(self) -> str:
        """Hash of the resolved config minus the seed: the seeds of one configuration share it."""
        data = self.to_dict()
        data.pop("seed")
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class Trial(NamedTuple):
    splits: DatasetSplits
    model: nn.Module
    defense: Defense
    train: TrainConfig


def load_splits(spec: TrialSpec) -> DatasetSplits:
    return create_dataset(spec.dataset, **spec.dataset_config)


def build_defense(spec: TrialSpec, splits: DatasetSplits) -> Defense:
    return create_defense(spec.defense, eps_data=splits.eps, **spec.defense_config)


def build_model(spec: TrialSpec, splits: DatasetSplits) -> nn.Module:
    """The model, initialised from the trial's seed (identical on every DDP rank)."""
    torch.manual_seed(spec.seed)
    return create_model(spec.model, num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size, mean=splits.mean, std=splits.std,
                        **spec.model_config)


def build_trial(spec: TrialSpec, splits: Optional[DatasetSplits] = None) -> Trial:
    splits = splits if splits is not None else load_splits(spec)
    defense = build_defense(spec, splits)
    return Trial(splits, build_model(spec, splits), defense, TrainConfig(**spec.train))
