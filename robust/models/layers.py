"""Pieces every model family shares: input normalisation, the classifier wrapper,
weight initialisation and the argument checks of a model factory.

Every model of the registry is ``NormalizedClassifier(Normalize(...), body)``: it
takes images in [0, 1] shaped (N, C, H, W), normalises them inside the model and
returns logits (N, num_classes).  Because normalisation is a layer, attacks,
input noise and certification always work in pixel space.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

# The keyword arguments every model factory accepts (see ``robust.models.create_model``).
COMMON_ARGS = ("num_classes", "in_channels", "image_size", "mean", "std")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with mean and std stored as buffers (no parameters).

    Args:
        mean: one value per channel; ``None`` means 0.5 for every channel.
        std: one positive value per channel; ``None`` means 0.5 for every channel,
            which maps [0, 1] to [-1, 1].
        in_channels: the number of channels C; each given sequence must have C values.

    Shape: (N, C, H, W) -> (N, C, H, W).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        mean_t, std_t = normalization_stats(mean, std, in_channels)
        self.register_buffer("mean", mean_t.reshape(1, in_channels, 1, 1))
        self.register_buffer("std", std_t.reshape(1, in_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Broadcasting would silently turn a 1-channel batch into C channels.
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"expected images shaped (N, {self.mean.shape[1]}, H, W), got {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def normalization_stats(
    mean: Optional[Sequence[float]], std: Optional[Sequence[float]], in_channels: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as float32 tensors (in_channels,); ValueError for a wrong length or std <= 0."""
    mean_t = _per_channel("mean", mean, in_channels)
    std_t = _per_channel("std", std, in_channels)
    if not bool(torch.all(std_t > 0)):
        raise ValueError(f"std must be positive per channel, got {std_t.tolist()}")
    return mean_t, std_t


def _per_channel(what: str, values: Optional[Sequence[float]], in_channels: int) -> torch.Tensor:
    """A float32 tensor (in_channels,) from ``values``, 0.5 per channel when ``None``."""
    if values is None:
        return torch.full((in_channels,), 0.5)
    tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
    if tensor.numel() != in_channels:
        raise ValueError(
            f"{what} has {tensor.numel()} values but in_channels={in_channels}; "
            "give one value per channel"
        )
    return tensor


class NormalizedClassifier(nn.Module):
    """``body(normalize(x))``: the form of every model in the registry.

    Shape: (N, C, H, W) images in [0, 1] -> (N, num_classes) logits.
    """

    def __init__(self, normalize: Normalize, body: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


def classifier(
    body: nn.Module,
    in_channels: int,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
) -> NormalizedClassifier:
    """Put a ``Normalize`` layer in front of ``body``."""
    return NormalizedClassifier(Normalize(mean, std, in_channels), body)


def check_model_args(
    model: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    extra: Mapping[str, Any],
    options: Sequence[str] = (),
) -> None:
    """Raise ValueError for an argument the factory of ``model`` cannot use.

    Called before any layer is built, so a bad argument fails fast.  ``extra``
    holds the keyword arguments left over after the factory took its own;
    ``options`` names the family-specific ones it accepts (for the message).
    """
    if extra:
        accepted = ", ".join((*COMMON_ARGS, *options))
        raise ValueError(
            f"model {model!r} got unexpected argument(s) {sorted(extra)}; it accepts {accepted}"
        )
    for arg, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model {model!r}: {arg} must be a positive int, got {value!r}")
    normalization_stats(mean, std, in_channels)


def init_weights_(model: nn.Module) -> None:
    """He initialisation for convolutions (He et al. 2015, fan-out, as torchvision's
    ResNets), BatchNorm as identity, zero biases; linear weights keep PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def residual_stage(
    block: Callable[[int, int, int], nn.Module],
    in_planes: int,
    out_planes: int,
    n: int,
    stride: int,
) -> nn.Sequential:
    """n residual blocks ``block(in_planes, out_planes, stride)``; only the first changes
    width and stride: (N, in_planes, H, W) -> (N, out_planes, ceil(H/stride), ceil(W/stride))."""
    first = block(in_planes, out_planes, stride)
    return nn.Sequential(first, *(block(out_planes, out_planes, 1) for _ in range(n - 1)))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm follows or precedes it)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias: the projection shortcut of residual networks."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
