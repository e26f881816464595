"""Standard training augmentation, batched on the images' device.

"crop-flip" is the standard CIFAR recipe (torchvision's ``RandomCrop(32,
padding=4)`` followed by ``RandomHorizontalFlip(0.5)``), "crop" the SVHN recipe
(digits must not be mirrored), None no augmentation.  Every example draws its
own offset and flip in one vectorised gather: no Python loop over examples.

Order with perturbation defenses: constant (or variable) perturbations are
added to the *un-augmented* training image, which gives the fixed perturbed
example x_i + delta_ij of the paper's augmented training set S-bar (eq. 4); the
standard augmentation is applied afterwards to that perturbed image, as ordinary
training on S-bar would do.  The perturbation is therefore a function of
(seed, example index, j) alone and never of the random crop or flip.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def augment_batch(
    x: Tensor,
    kind: Optional[str],
    generator: Optional[torch.Generator] = None,
    padding: int = 4,
) -> Tensor:
    """Augment a batch x (B, C, H, W) in [0, 1]; returns the same shape and range on x's device.

    kind: "crop-flip" (random crop with zero padding ``padding``, then a
    horizontal flip with probability 0.5), "crop" (random crop only) or None
    (identity, x itself is returned).  ``generator`` makes the draws
    reproducible; it may live on the CPU while x is on an accelerator.
    """
    if kind is None:
        return x
    if kind not in ("crop-flip", "crop"):
        raise ValueError(f"unknown augmentation {kind!r}; valid choices: 'crop-flip', 'crop', None")
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (B, C, H, W), got shape {tuple(x.shape)}")
    batch, _, height, width = x.shape
    draw_device = generator.device if generator is not None else x.device

    # Offsets in [0, 2 * padding] into the zero-padded image; offset == padding is no shift.
    offset_y = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=draw_device).to(x.device)
    offset_x = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=draw_device).to(x.device)
    rows = offset_y[:, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = offset_x[:, None] + torch.arange(width, device=x.device)  # (B, W)
    if kind == "crop-flip":
        flip = torch.rand(batch, generator=generator, device=draw_device).to(x.device) < 0.5
        # Flipping the crop reverses its columns.
        cols = torch.where(flip[:, None], cols.flip(1), cols)

    padded = F.pad(x, (padding, padding, padding, padding))  # zeros, (B, C, H + 2p, W + 2p)
    # Gather rows, then columns, per example.
    index_rows = rows[:, None, :, None].expand(batch, x.shape[1], height, padded.shape[3])
    out = padded.gather(2, index_rows)  # (B, C, H, W + 2p)
    index_cols = cols[:, None, None, :].expand(batch, x.shape[1], height, width)
    return out.gather(3, index_cols)
