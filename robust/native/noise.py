"""Fresh per-element Gaussian feature noise, h + theta * N(0, 1), on the native kernels.

:func:`add_feature_noise` is what the noise-injection modules call.  On the CPU
with float32 tensors it runs ``noise.cpp``: one fused pass draws the noise of
every element from (seed, element index) and writes h + theta * z; the backward
pass regenerates the same z to form d loss / d theta = sum over the batch of
grad * z, so no noise tensor is kept for backward.  The seed is one 63-bit draw
from the caller's generator, so a seeded generator reproduces the noise exactly
and the noise follows the training loop's seed like any PyTorch draw.  Elsewhere
(CUDA, other dtypes, kernels unavailable) it is ``torch.randn`` plus ``addcmul``,
the same distribution from PyTorch's generator.

Noise values depend on the memory order of h (contiguous or channels_last): the
element at memory position i of the batch takes draw i.  The same seed therefore
reproduces the same noise for the same layout on the same build; across CPUs
whose builds differ in fused multiply-adds the values may differ in the last bits.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from robust.native import library

#: Exclusive upper bound of the seeds drawn from the caller's generator.
SEED_BOUND = 2 ** 63 - 1


def draw_seed(generator: Optional[torch.Generator]) -> int:
    """One key for the counter-based generator, drawn from ``generator`` (None: torch's global RNG)."""
    return int(torch.randint(0, SEED_BOUND, (), generator=generator, dtype=torch.int64))


def normal(shape: Tuple[int, ...], seed: int) -> Tensor:
    """N(0, 1) values of the given shape from the native generator (element i is draw i)."""
    lib = library()
    if lib is None:
        raise RuntimeError("native noise kernels are unavailable (see the warning above, or ROBUST_NATIVE=0)")
    out = torch.empty(shape, dtype=torch.float32)
    lib.robust_normal(out.data_ptr(), out.numel(), seed, torch.get_num_threads())
    return out


def _native_ok(h: Tensor, theta: Tensor) -> bool:
    return (h.device.type == "cpu" and h.dtype == torch.float32 and theta.dtype == torch.float32
            and theta.device.type == "cpu" and h.dim() >= 2 and tuple(theta.shape) == tuple(h.shape[1:])
            and h.numel() > 0 and library() is not None)


def _layout(h: Tensor, theta: Tensor) -> Tuple[Tensor, Tensor, torch.memory_format]:
    """h in a dense layout, theta flattened in the same per-sample memory order, and the layout."""
    if h.is_contiguous():
        return h, theta.contiguous().reshape(-1), torch.contiguous_format
    if h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last):
        return h, theta.permute(1, 2, 0).contiguous().reshape(-1), torch.channels_last
    return h.contiguous(), theta.contiguous().reshape(-1), torch.contiguous_format


class _NativeFeatureNoise(torch.autograd.Function):
    """out = h + theta * z(seed); d out / d h = identity, d loss / d theta = sum_batch grad * z."""

    @staticmethod
    def forward(ctx, h: Tensor, theta: Tensor, seed: int) -> Tensor:  # type: ignore[override]
        h, flat_theta, fmt = _layout(h, theta)
        out = torch.empty_like(h, memory_format=fmt)
        library().robust_noise_forward(h.data_ptr(), flat_theta.data_ptr(), out.data_ptr(), h.numel(),
                                       flat_theta.numel(), seed, torch.get_num_threads())
        ctx.seed, ctx.fmt, ctx.theta_shape = seed, fmt, tuple(theta.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad_theta = None
        if ctx.needs_input_grad[1]:
            g = grad.contiguous(memory_format=ctx.fmt)
            features = 1
            for size in ctx.theta_shape:
                features *= size
            flat = torch.empty(features, dtype=torch.float32)
            library().robust_noise_grad_theta(g.data_ptr(), flat.data_ptr(), g.numel(), features, ctx.seed,
                                              torch.get_num_threads())
            if ctx.fmt == torch.channels_last:
                c, height, width = ctx.theta_shape
                grad_theta = flat.view(height, width, c).permute(2, 0, 1).contiguous()
            else:
                grad_theta = flat.view(ctx.theta_shape)
        return grad, grad_theta, None


def add_feature_noise(h: Tensor, theta: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """h + theta * N(0, 1) with fresh noise per element; theta has the shape of one sample of h.

    Gradients flow to h (identity) and to theta where it requires them.
    """
    if _native_ok(h, theta):
        return _NativeFeatureNoise.apply(h, theta, draw_seed(generator))
    noise = torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
    return torch.addcmul(h, theta, noise)  # one fused kernel: h + theta * noise
