"""Device choice and the CUDA-only speed-ups (AMP, channels_last), in one place."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import Tensor, nn


def default_device() -> torch.device:
    """CUDA when present, else CPU.  (Under Ray Train the adapter passes its own device.)"""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prepare_module(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; on CUDA use channels_last, which convolutions run faster in."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_input(x: Tensor, device: torch.device) -> Tensor:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def fast_layout(x: Tensor) -> Tensor:
    """``x`` in the memory layout that convolutions run fastest on: channels_last for
    multi-channel images, on CPU as on CUDA.  Measured on this 2-core CPU, one
    forward + input-gradient pass of ResNet-20 on 128 images took 1.21x less time
    with a channels_last input (oneDNN picks its NHWC kernels from the input's
    layout; the weights stay as they are).  Single-channel and non-image inputs are
    returned unchanged (both layouts are the same memory)."""
    if x.dim() == 4 and x.shape[1] > 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(device: torch.device, enabled: bool) -> ContextManager:
    """bfloat16 autocast on CUDA when ``enabled`` (no loss scaling needed); a no-op on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
