"""ResNet-18 for 32x32 images, standard and pre-activation.

- ``resnet18``: He, Zhang, Ren & Sun, "Deep Residual Learning for Image
  Recognition", CVPR 2016, in the CIFAR form used across the adversarial
  robustness literature: a 3x3 stem convolution and no max-pool, BasicBlocks
  [2, 2, 2, 2] with 64/128/256/512 channels, 1x1 conv + BN projection
  shortcuts.  11,173,962 parameters for 10 classes.
- ``preact-resnet18``: He, Zhang, Ren & Sun, "Identity Mappings in Deep
  Residual Networks", ECCV 2016: the same layout with BN-ReLU before each
  convolution, an identity path free of nonlinearities, and a final BN-ReLU
  before pooling.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Type, Union

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

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


class BasicBlock(nn.Module):
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
            self.shortcut = nn.Sequential(
                conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes)
            )
        # An identity on the residual sum, before the final ReLU: a place where a
        # defense may insert a module (feature noise) without touching the block.
        self.sum_hook: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(self.sum_hook(out + self.shortcut(x)), inplace=True)


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus shortcut (no activation after the sum);
    (N, in_planes, H, W) -> (N, planes, ceil(H/stride), ceil(W/stride))."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or in_planes != planes:
            self.shortcut = conv1x1(in_planes, planes, stride)
        # An identity on the block's output (the residual sum): a place where a
        # defense may insert a module (feature noise) without touching the block.
        self.sum_hook: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x), inplace=True)
        # A projection shortcut takes the pre-activated input (Identity Mappings, fig. 4(e)).
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        return self.sum_hook(out + shortcut)


Block = Union[Type[BasicBlock], Type[PreActBlock]]


class ResNet(nn.Module):
    """Four stages of ``blocks_per_stage`` blocks, global average pooling, a linear head.

    Shape: (N, in_channels, H, W) normalised images -> (N, num_classes); H, W >= 1.
    With ``preact`` the stem is a bare convolution (the first block activates
    it) and a BN-ReLU follows the last stage.
    """

    def __init__(
        self,
        block: Block,
        blocks_per_stage: Sequence[int],
        num_classes: int,
        in_channels: int,
        preact: bool,
    ) -> None:
        super().__init__()
        stem_width = STAGE_WIDTHS[0]
        self.stem: nn.Module
        self.final: nn.Module
        if preact:
            self.stem = conv3x3(in_channels, stem_width)
            self.final = nn.Sequential(nn.BatchNorm2d(STAGE_WIDTHS[-1]), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(
                conv3x3(in_channels, stem_width), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
            )
            self.final = nn.Identity()
        in_widths = (stem_width, *STAGE_WIDTHS[:-1])
        self.stages = nn.Sequential(
            *(
                residual_stage(block, in_planes, planes, n, stride)
                for in_planes, planes, n, stride in zip(
                    in_widths, STAGE_WIDTHS, blocks_per_stage, STAGE_STRIDES
                )
            )
        )
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.final(self.stages(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _resnet18(
    model: str,
    preact: bool,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **extra: Any,
) -> NormalizedClassifier:
    check_model_args(model, num_classes, in_channels, image_size, mean, std, extra)
    block: Block = PreActBlock if preact else BasicBlock
    body = ResNet(block, (2, 2, 2, 2), num_classes, in_channels, preact)
    return classifier(body, in_channels, mean, std)


@MODELS.register("resnet18")
def resnet18(**kwargs: Any) -> NormalizedClassifier:
    """CIFAR ResNet-18: (N, C, H, W) in [0, 1] -> (N, num_classes); 11.2M parameters."""
    return _resnet18("resnet18", preact=False, **kwargs)


@MODELS.register("preact-resnet18")
def preact_resnet18(**kwargs: Any) -> NormalizedClassifier:
    """Pre-activation ResNet-18: (N, C, H, W) in [0, 1] -> (N, num_classes); 11.2M parameters."""
    return _resnet18("preact-resnet18", preact=True, **kwargs)
