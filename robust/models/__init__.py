"""Model registry: ``create_model(name, ...)`` builds any classifier by name.

Every model takes images in [0, 1] shaped (N, C, H, W) and returns logits
(N, num_classes); normalisation is its first layer (``layers.Normalize``).
Adding a model touches one family file (a ``@MODELS.register`` factory) and, for
a new family, one import line below.

Wide-ResNets of any depth and width resolve by name: ``wrn-D-K`` with
(D - 4) % 6 == 0, e.g. ``wrn-34-10``, even when not registered.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from torch import nn

from robust.registry import Registry, UnknownNameError

MODELS = Registry("model")

# Importing a family registers its models (a dict entry each, no other work).
from robust.models import cifar_resnet  # noqa: E402,F401
from robust.models import resnet  # noqa: E402,F401
from robust.models import small  # noqa: E402,F401
from robust.models import wide_resnet  # noqa: E402

__all__ = ["MODELS", "check_model_name", "create_model", "model_names"]


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the model ``name``.

    Shape: (N, in_channels, image_size, image_size) images in [0, 1] -> (N, num_classes) logits.

    ``mean`` and ``std`` (one value per channel, 0.5 when ``None``) configure the
    model's own normalisation layer; ``kwargs`` are family options (``dropout``
    for Wide-ResNets, ``width`` for CIFAR ResNets).  Raises UnknownNameError for
    an unknown name and ValueError for an unknown option or an invalid value.
    """
    check_model_name(name)
    common = dict(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, mean=mean, std=std
    )
    if name in MODELS:
        model = MODELS.create(name, **common, **kwargs)
    else:
        depth, widen_factor = wide_resnet.parse_wrn_name(name)  # type: ignore[misc]
        model = wide_resnet.wide_resnet(depth, widen_factor, **common, **kwargs)
    # The (C, H, W) the model was built for, a plain attribute (not in the state dict):
    # defenses that size modules by the feature maps (per-element noise scales) read it.
    model.input_shape = (in_channels, image_size, image_size)
    return model


def check_model_name(name: str) -> str:
    """Return ``name`` if it names a model (registered or ``wrn-D-K``), else raise
    UnknownNameError listing the valid choices.  Builds nothing."""
    shape = wide_resnet.parse_wrn_name(name)
    if name in MODELS or (shape is not None and (shape[0] - 4) % 6 == 0):
        return name
    raise UnknownNameError(
        f"unknown model {name!r}; valid choices: {', '.join(MODELS.names())}, "
        "or wrn-D-K for any Wide-ResNet with (D - 4) % 6 == 0 (e.g. wrn-34-10)"
    )


def model_names() -> List[str]:
    """The registered model names, sorted (``wrn-D-K`` also resolves for other D, K)."""
    return MODELS.names()
