"""Gaussian blur of a batch with one ``sigma`` per image: torchvision's taps, reflect padding, separable,
one grouped convolution per direction for the whole batch. The kernel size and the per-view
probabilities are the CPU path's (:func:`~dinov2.data.augmentations.blur_kernel_size`,
:func:`~dinov2.data.augmentations.blur_probabilities`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels ``(N, k)``, one per ``sigma`` (torchvision's taps)."""
    half = (kernel_size - 1) / 2.0
    taps = torch.arange(kernel_size, dtype=sigma.dtype, device=sigma.device) - half
    kernels = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each image of ``(N, C, H, W)`` with its own ``sigma``: separable, reflect padding, one
    grouped convolution per direction for the whole batch."""
    n, c, height, width = x.shape
    pad = kernel_size // 2
    weight = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # (N·C, k)
    y = x.reshape(1, n * c, height, width)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), weight.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), weight.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.reshape(n, c, height, width)
