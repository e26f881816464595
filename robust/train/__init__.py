"""The single training loop shared by every defense (see :mod:`robust.train.loop`)."""
from robust.train.config import TrainConfig
from robust.train.loop import NonFiniteLoss, TrainState, fit

__all__ = ["TrainConfig", "TrainState", "NonFiniteLoss", "fit"]
