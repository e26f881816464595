"""Small networks for MNIST-sized inputs and for CPU runs on 8x8 digits.

- ``lenet``: the MNIST LeNet (LeCun et al. 1995) of the constant-random-
  perturbations paper, appendix A.1: conv 32@5x5 -> ReLU -> 2x2 max-pool,
  conv 64@5x5 -> ReLU -> 2x2 max-pool, FC 1024 -> ReLU, FC num_classes.
  Padding 2 keeps each convolution size-preserving, so it works on 28x28
  (flatten 64*7*7) and on 8x8 (flatten 64*2*2) inputs.
- ``mlp3``: the SDR paper's 784-100-100-100-10 MLP (three hidden ReLU layers
  of 100; "Stochastic delta rule", section 5), for any input size.
- ``cnn7``: seven 3x3 convolutions with ReLU, 32-32-pool-64-64-pool-128-128-
  128-pool, global average pooling and a linear head; the pools round up
  (ceil mode), so any input size >= 1 works (8x8 digits, 32x32 CIFAR).
- ``small-cnn``: conv 32@3x3 -> ReLU -> conv 64@3x3 -> ReLU -> 2x2 max-pool ->
  FC 128 -> ReLU -> FC num_classes: a few seconds per epoch on scikit-learn's
  8x8 digits with two CPU cores.

``lenet``, ``mlp3`` and ``small-cnn`` end in a fully connected layer sized from
``image_size``: they accept (N, C, image_size, image_size) inputs only.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from robust.models import MODELS
from robust.models.layers import NormalizedClassifier, check_model_args, classifier, init_weights_


def _conv_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    """A size-preserving convolution (odd kernel, 'same' padding) and its ReLU."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    return [conv, nn.ReLU(inplace=True)]


def _build(
    body: nn.Module,
    in_channels: int,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
) -> NormalizedClassifier:
    """Initialise ``body`` and put the normalisation layer in front of it."""
    init_weights_(body)
    return classifier(body, in_channels, mean, std)


def _min_size(model: str, image_size: int, minimum: int) -> None:
    if image_size < minimum:
        raise ValueError(f"model {model!r} needs image_size >= {minimum}, got {image_size}")


@MODELS.register("lenet")
def lenet(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **extra: Any,
) -> NormalizedClassifier:
    """LeNet: (N, in_channels, image_size, image_size) in [0, 1] -> (N, num_classes)."""
    check_model_args("lenet", num_classes, in_channels, image_size, mean, std, extra)
    _min_size("lenet", image_size, 4)
    pooled = image_size // 2 // 2
    body = nn.Sequential(
        *_conv_relu(in_channels, 32, 5),
        nn.MaxPool2d(2),
        *_conv_relu(32, 64, 5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * pooled * pooled, 1024),
        nn.ReLU(inplace=True),
        nn.Linear(1024, num_classes),
    )
    return _build(body, in_channels, mean, std)


@MODELS.register("mlp3")
def mlp3(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **extra: Any,
) -> NormalizedClassifier:
    """3-hidden-layer MLP: (N, in_channels, image_size, image_size) in [0, 1] -> (N, classes)."""
    check_model_args("mlp3", num_classes, in_channels, image_size, mean, std, extra)
    hidden = 100
    body = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
    return _build(body, in_channels, mean, std)


@MODELS.register("cnn7")
def cnn7(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **extra: Any,
) -> NormalizedClassifier:
    """Seven-convolution CNN: (N, in_channels, H, W) in [0, 1] -> (N, num_classes); H, W >= 1."""
    check_model_args("cnn7", num_classes, in_channels, image_size, mean, std, extra)
    body = nn.Sequential(
        *_conv_relu(in_channels, 32, 3),
        *_conv_relu(32, 32, 3),
        nn.MaxPool2d(2, ceil_mode=True),
        *_conv_relu(32, 64, 3),
        *_conv_relu(64, 64, 3),
        nn.MaxPool2d(2, ceil_mode=True),
        *_conv_relu(64, 128, 3),
        *_conv_relu(128, 128, 3),
        *_conv_relu(128, 128, 3),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )
    return _build(body, in_channels, mean, std)


@MODELS.register("small-cnn")
def small_cnn(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **extra: Any,
) -> NormalizedClassifier:
    """Small CNN for 8x8 digits.

    Shape: (N, in_channels, image_size, image_size) in [0, 1] -> (N, num_classes).
    """
    check_model_args("small-cnn", num_classes, in_channels, image_size, mean, std, extra)
    _min_size("small-cnn", image_size, 2)
    pooled = image_size // 2
    body = nn.Sequential(
        *_conv_relu(in_channels, 32, 3),
        *_conv_relu(32, 64, 3),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * pooled * pooled, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )
    return _build(body, in_channels, mean, std)
