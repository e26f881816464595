"""CIFAR ResNets of He, Zhang, Ren & Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016, section 4.2.

Depth 6n + 2: a 3x3 stem convolution with 16 channels, three stages of n basic
blocks with 16, 32 and 64 channels (the last two start with stride 2), global
average pooling and a linear head.  Shortcuts are the paper's option A:
parameter-free identities that subsample by 2 and zero-pad the new channels,
so ResNet-20 has 269,722 and ResNet-56 853,018 parameters (0.27M and 0.85M,
as in the paper's table 6).  ``width`` multiplies every channel count.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust.models import MODELS
from robust.models.layers import (
    NormalizedClassifier,
    check_model_args,
    classifier,
    conv3x3,
    init_weights_,
    residual_stage,
)

STAGE_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel and zero-pad channels.

    Shape: (N, in_planes, H, W) -> (N, out_planes, ceil(H/stride), ceil(W/stride)),
    the shape of a 3x3, padding-1 convolution with the same stride.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(
                f"option-A shortcut cannot drop channels ({in_planes} -> {out_planes})"
            )
        self.stride = stride
        self.pad_before = (out_planes - in_planes) // 2
        self.pad_after = out_planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's tuple runs from the last dimension back: (W, W, H, H, C, C).
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class CifarBasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU;
    (N, in_planes, H, W) -> (N, planes, ceil(H/stride), ceil(W/stride))."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes, stride)
        # An identity on the residual sum, before the final ReLU: a place where a
        # defense may insert a module (feature noise) without touching the block.
        self.sum_hook: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(self.sum_hook(out + self.shortcut(x)), inplace=True)


class CifarResNet(nn.Module):
    """The body: (N, in_channels, H, W) normalised images -> (N, num_classes); H, W >= 1."""

    def __init__(self, depth: int, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        widths = [w * width for w in STAGE_WIDTHS]
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        # The first stage keeps the stem's width and resolution; the others halve it.
        self.stages = nn.Sequential(
            residual_stage(CifarBasicBlock, widths[0], widths[0], blocks_per_stage, 1),
            residual_stage(CifarBasicBlock, widths[0], widths[1], blocks_per_stage, 2),
            residual_stage(CifarBasicBlock, widths[1], widths[2], blocks_per_stage, 2),
        )
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    width: int = 1,
    **extra: Any,
) -> NormalizedClassifier:
    """ResNet-depth (depth = 6n + 2): (N, in_channels, H, W) in [0, 1] -> (N, num_classes).

    Raises ValueError for a depth not of the form 6n + 2 (n >= 1) or a width < 1.
    """
    name = f"resnet{depth}"
    check_model_args(
        name, num_classes, in_channels, image_size, mean, std, extra, options=("width",)
    )
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"{name}: depth must be 6n + 2 with n >= 1, got {depth}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"{name}: width must be a positive int, got {width!r}")
    return classifier(CifarResNet(depth, num_classes, in_channels, width), in_channels, mean, std)


@MODELS.register("resnet20")
def resnet20(**kwargs: Any) -> NormalizedClassifier:
    """ResNet-20 (n = 3), 0.27M parameters at width 1."""
    return cifar_resnet(20, **kwargs)


@MODELS.register("resnet32")
def resnet32(**kwargs: Any) -> NormalizedClassifier:
    """ResNet-32 (n = 5), 0.46M parameters at width 1."""
    return cifar_resnet(32, **kwargs)


@MODELS.register("resnet44")
def resnet44(**kwargs: Any) -> NormalizedClassifier:
    """ResNet-44 (n = 7), 0.66M parameters at width 1."""
    return cifar_resnet(44, **kwargs)


@MODELS.register("resnet56")
def resnet56(**kwargs: Any) -> NormalizedClassifier:
    """ResNet-56 (n = 9), 0.85M parameters at width 1."""
    return cifar_resnet(56, **kwargs)
