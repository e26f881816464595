"""Wide residual networks: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.

WRN-D-K has depth D = 6n + 4 (a stem convolution, three groups of n
pre-activation basic blocks with 16K, 32K and 64K channels, a linear head) and
widening factor K.  Blocks are BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 (the
paper's B(3,3) with dropout between the convolutions, section 2.4), with a 1x1
projection shortcut where the shape changes.

``wrn-28-10`` (36,479,194 parameters for 10 classes) is the CIFAR-10 network of
the constant-random-perturbations paper, appendix A.1, trained with dropout 0.1,
which is the default here for every depth and width.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from robust.models import MODELS
from robust.models.layers import (
    NormalizedClassifier,
    check_model_args,
    classifier,
    conv1x1,
    conv3x3,
    init_weights_,
    residual_stage,
)

WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)")
DEFAULT_DROPOUT = 0.1


class WideBasicBlock(nn.Module):
    """Pre-activation block;
    (N, in_planes, H, W) -> (N, out_planes, ceil(H/stride), ceil(W/stride))."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_planes, out_planes)
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = conv1x1(in_planes, out_planes, stride)
        # An identity on the block's output (the residual sum): a place where a
        # defense may insert a module (feature noise) without touching the block.
        self.sum_hook: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x), inplace=True)
        # The projection sees the pre-activated input, the identity the raw one
        # (He et al. 2016, "Identity mappings", figure 4(e)).
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out), inplace=True)))
        return self.sum_hook(out + shortcut)


class WideResNet(nn.Module):
    """The WRN body: (N, in_channels, H, W) normalised images -> (N, num_classes) logits.

    Global average pooling before the head makes any H, W >= 1 work (8x8 at 32x32).
    """

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int, dropout: float
    ) -> None:
        super().__init__()
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(in_channels, widths[0])
        block = partial(WideBasicBlock, dropout=dropout)
        self.block1 = residual_stage(block, widths[0], widths[1], blocks_per_group, 1)
        self.block2 = residual_stage(block, widths[1], widths[2], blocks_per_group, 2)
        self.block3 = residual_stage(block, widths[2], widths[3], blocks_per_group, 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def parse_wrn_name(name: str) -> Optional[Tuple[int, int]]:
    """``"wrn-34-10"`` -> (34, 10); ``None`` when ``name`` is not of the form wrn-D-K."""
    match = WRN_NAME.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def wide_resnet(
    depth: int,
    widen_factor: int,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    dropout: float = DEFAULT_DROPOUT,
    **extra: Any,
) -> NormalizedClassifier:
    """WRN-depth-widen_factor: (N, in_channels, H, W) in [0, 1] -> (N, num_classes).

    Raises ValueError unless depth = 6n + 4 with n >= 1, widen_factor >= 1 and
    0 <= dropout < 1.
    """
    name = f"wrn-{depth}-{widen_factor}"
    check_model_args(
        name, num_classes, in_channels, image_size, mean, std, extra, options=("dropout",)
    )
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(
            f"{name}: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}"
        )
    if widen_factor < 1:
        raise ValueError(f"{name}: widen factor must be >= 1, got {widen_factor}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
    body = WideResNet(depth, widen_factor, num_classes, in_channels, dropout)
    return classifier(body, in_channels, mean, std)


@MODELS.register("wrn-28-10")
def wrn_28_10(**kwargs: Any) -> NormalizedClassifier:
    """WRN-28-10, 36.5M parameters: the CIFAR-10 network of the constant-perturbation paper."""
    return wide_resnet(28, 10, **kwargs)


@MODELS.register("wrn-16-4")
def wrn_16_4(**kwargs: Any) -> NormalizedClassifier:
    """WRN-16-4, 2.7M parameters: a Wide-ResNet small enough for quick CIFAR runs."""
    return wide_resnet(16, 4, **kwargs)
