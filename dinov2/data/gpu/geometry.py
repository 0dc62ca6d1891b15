"""Per-sample multi-crop geometry on the device: torchvision's random-resized-crop boxes, vectorised,
and one ``grid_sample`` that cuts, flips and resizes every crop of a group.

Boxes: up to :data:`CROP_ATTEMPTS` attempts of an area fraction ``~ U(scale)`` and a log-uniform aspect
ratio in :data:`RATIO`, rounded to an integer box that must fit (the first that fits wins), else the
central fall-back box. Resampling is ``grid_sample``'s bicubic (the CPU path's) or bilinear — equal to
``torch.nn.functional.interpolate`` of the cut box inside it, but the outermost output pixels read the
image just outside the box where cut-then-resize clamps to the box's edge. When a crop can shrink the
image by ≥ 1.5×, the grid is supersampled and box-averaged (an approximate antialias filter; the CPU
path antialiases exactly). The horizontal flip is folded into the grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov2.data.gpu.generators import uniform

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of torchvision's RandomResizedCrop (the CPU path's)
CROP_ATTEMPTS = 10  # torchvision's number of tries before the central fall-back box
INTERPOLATIONS = ("bicubic", "bilinear")


def random_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float] = RATIO,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``(n, 4)`` float boxes ``(top, left, h, w)`` (integer values) drawn by torchvision's rule.

    For each box, :data:`CROP_ATTEMPTS` candidates draw an area ``H·W·U(scale)`` and an aspect ratio
    ``exp(U(log ratio))``; ``w = round(√(area·aspect))``, ``h = round(√(area/aspect))``; the first
    candidate that fits the image is placed uniformly at integer offsets. When none fits, the largest
    central box with an aspect ratio in ``ratio`` is used.
    """
    device = torch.device(device)
    u = uniform((n, CROP_ATTEMPTS, 4), generator, device)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[..., 2] * (height - h + 1))  # uniform integer in [0, H - h]
    left = torch.floor(u[..., 3] * (width - w + 1))
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first fitting attempt (argmax: first max)
    boxes = torch.stack([t.gather(1, first).squeeze(1) for t in (top, left, h, w)], dim=1)
    found = fits.any(dim=1, keepdim=True)
    fallback = torch.tensor(central_box(height, width, ratio), dtype=torch.float32)
    return torch.where(found, boxes, fallback.to(device, non_blocking=True))


def central_box(height: int, width: int, ratio: Sequence[float] = RATIO) -> tuple[int, int, int, int]:
    """torchvision's fall-back ``(top, left, h, w)``: the whole image, narrowed to the nearest aspect
    ratio in ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def supersample_factor(
    height: int, width: int, size: int, scale: Sequence[float], ratio: Sequence[float] = RATIO, limit: int = 4
) -> int:
    """Samples per output pixel side so that the largest possible crop is not aliased when shrunk.

    ``round(largest crop side / size)``, between 1 and ``limit``: 1 (plain resampling) unless a crop
    can be ≥ 1.5× larger than the output."""
    area = height * width * max(scale)
    side = max(min(width, math.sqrt(area * max(ratio))), min(height, math.sqrt(area / min(ratio))))
    return int(min(limit, max(1, round(side / size))))


def crop_grid(
    boxes: Tensor, flips: Tensor, height: int, width: int, size: int, num_views: int, supersample: int = 1
) -> Tensor:
    """The ``grid_sample`` grid of ``num_views`` crops per image, ``(B, V·s, s, 2)`` with ``s = size·supersample``.

    ``boxes (V·B, 4)`` and ``flips (V·B,)`` are view-major. The views of one image are stacked along
    the grid's height, so one ``grid_sample`` over the ``B`` images makes every crop without copying
    an image ``V`` times. Output pixel centres map onto the box with ``align_corners=False`` semantics
    (the mapping of ``torch.nn.functional.interpolate``)."""
    s = size * supersample
    batch = boxes.shape[0] // num_views
    t = (torch.arange(s, device=boxes.device, dtype=boxes.dtype) + 0.5) / s
    top, left, h, w = boxes.unbind(1)
    tx = torch.where(flips[:, None], 1.0 - t, t)
    x = (left[:, None] + tx * w[:, None]) * (2.0 / width) - 1.0  # (n, s), view-major
    y = (top[:, None] + t * h[:, None]) * (2.0 / height) - 1.0
    # image-major before the grid is expanded: the (n, s) coordinates are reordered, not the (n, s, s) grid
    x = x.view(num_views, batch, s).transpose(0, 1)
    y = y.view(num_views, batch, s).transpose(0, 1)
    shape = (batch, num_views, s, s)
    grid = torch.stack([x[:, :, None, :].expand(shape), y[..., None].expand(shape)], dim=-1)
    return grid.view(batch, num_views * s, s, 2)


def resample_crops(
    images: Tensor, grid: Tensor, num_views: int, size: int, supersample: int = 1, mode: str = "bicubic"
) -> Tensor:
    """Float images ``(B, 3, H, W)`` in [0, 1] + :func:`crop_grid` → crops ``(V·B, 3, size, size)``, view-major."""
    batch, channels = images.shape[:2]
    out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    if supersample > 1:  # box-average the supersamples; windows never straddle two views
        out = F.avg_pool2d(out, supersample)
    out = out.reshape(batch, channels, num_views, size, size).permute(2, 0, 1, 3, 4)
    out = out.reshape(num_views * batch, channels, size, size)
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out  # bicubic overshoots
