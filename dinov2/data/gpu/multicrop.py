"""DINOv2 multi-crop augmentation of whole ``uint8`` batches on the device.

The CPU pipeline (:mod:`dinov2.data.augmentations`) augments one PIL image at a time in loader
workers; thousands of images per second times ten crops is more than a few CPU cores can do. Here the
same augmentation runs on a ``uint8`` batch that is already on the device, with batched tensor ops
only (no Python loop over samples), from the same :class:`~dinov2.config.CropsConfig`. Per crop:

1. **random resized crop** (:mod:`~dinov2.data.gpu.geometry`): torchvision's rule, vectorised, then
   the boxes are resampled to the crop size by **one** ``grid_sample`` call per crop group (bicubic by
   default, as the CPU path; or bilinear), supersampled when the crops can shrink the image by ≥ 1.5×;
2. **horizontal flip** with ``hflip_p``, folded into the sampling grid;
3. **colour jitter** with ``color_jitter_p`` (:mod:`~dinov2.data.gpu.colour`): brightness, contrast,
   saturation and hue factors drawn as torchvision does, applied in a random order per crop;
4. **grayscale** with ``grayscale_p`` (ITU-R 601 luma weights, repeated on 3 channels);
5. **Gaussian blur** (:mod:`~dinov2.data.gpu.blur`) with ``blur_p_global1`` / ``blur_p_global2`` /
   ``blur_p_local`` per view (inverted with ``blur_as_released``, as the CPU path), ``σ ~ U(blur_sigma)``
   per crop, the CPU path's kernel size, reflect padding; separable, one grouped convolution per
   direction for the whole group;
6. **solarize** on the second global crop only, with ``solarize_p_global2``: ``x ≥ threshold → 1 − x``;
7. **normalize** with ``mean`` / ``std``.

Every random draw comes from the generator passed in (:func:`~dinov2.data.gpu.generators.batch_generator`
in the training stream).

Differences from the CPU path, all deliberate: pixels stay float in ``[0, 1]`` between the colour
steps (the CPU path truncates to ``uint8`` after each one); resampling is ``grid_sample``'s rather than
PIL's, and its antialiasing is approximate (see :mod:`~dinov2.data.gpu.geometry`); the random numbers
differ (same distributions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dinov2.data.augmentations import blur_kernel_size, blur_probabilities
from dinov2.data.gpu.blur import gaussian_blur
from dinov2.data.gpu.colour import color_jitter, grayscale, jitter_params, solarize
from dinov2.data.gpu.generators import uniform
from dinov2.data.gpu.geometry import (
    INTERPOLATIONS,
    RATIO,
    crop_grid,
    random_resized_crop_boxes,
    resample_crops,
    supersample_factor,
)

if TYPE_CHECKING:
    from dinov2.config import CropsConfig


def as_nchw(images: Tensor) -> Tensor:
    """A ``uint8`` batch ``(B, 3, H, W)`` or ``(B, H, W, 3)`` as ``(B, 3, H, W)`` (a view, no copy)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"expected a (B, 3, H, W) or (B, H, W, 3) batch, got shape {tuple(images.shape)}")
    if images.shape[1] == 3:
        return images
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)
    raise ValueError(f"expected 3 colour channels in dim 1 or 3, got shape {tuple(images.shape)}")


class GPUMultiCrop:
    """``uint8`` batch ``(B, H, W, 3)`` or ``(B, 3, H, W)`` → ``{"global_crops": (2B, 3, G, G),
    "local_crops": (nB, 3, L, L)}`` normalised crops, view-major like ``dinov2.data.collate``
    (row ``v·B + b`` is view ``v`` of image ``b``), on the batch's device. See the module docstring.

    ``interpolation``: ``bicubic`` (the CPU path's) or ``bilinear``; ``antialias``: supersample when the
    crops shrink the image (see :func:`supersample_factor`); ``out_dtype``: dtype of the crops.
    """

    def __init__(
        self,
        cfg: CropsConfig,
        interpolation: str = "bicubic",
        antialias: bool = True,
        out_dtype: torch.dtype = torch.float32,
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation '{interpolation}' (choose from {', '.join(INTERPOLATIONS)})")
        if not 0.0 <= cfg.hue <= 0.5:
            raise ValueError(f"data.crops.hue must be in [0, 0.5], got {cfg.hue}")
        self.cfg = cfg
        self.interpolation = interpolation
        self.antialias = antialias
        self.out_dtype = out_dtype

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"GPUMultiCrop(global={c.global_crops_size}px×2 scale={c.global_crops_scale}, "
            f"local={c.local_crops_size}px×{c.local_crops_number} scale={c.local_crops_scale}, "
            f"interpolation={self.interpolation}, antialias={self.antialias})"
        )

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None, *, return_params: bool = False
    ) -> dict[str, Any]:
        """The crops of ``images`` (and, with ``return_params``, the per-crop draws under ``"params"``:
        ``{"global": {...}, "local": {...}}`` with ``boxes (n, 4)`` as ``(top, left, h, w)``, ``flip``,
        ``jitter``, ``grayscale``, ``blur``, ``sigma``, ``solarize`` and the ``jitter_*`` draws of
        :func:`jitter_params` per crop, view-major)."""
        c = self.cfg
        blur_global1, blur_global2, blur_local = blur_probabilities(c)
        pixels = as_nchw(images).float().div_(255.0)
        global_crops, global_params = self._group(
            pixels, 2, c.global_crops_size, c.global_crops_scale,
            blur_p=(blur_global1, blur_global2), solarize_p=(0.0, c.solarize_p_global2),
            generator=generator,
        )  # fmt: skip
        out: dict[str, Any] = {"global_crops": global_crops}
        params = {"global": global_params}
        if c.local_crops_number > 0:
            n = c.local_crops_number
            out["local_crops"], params["local"] = self._group(
                pixels, n, c.local_crops_size, c.local_crops_scale,
                blur_p=(blur_local,) * n, solarize_p=(0.0,) * n, generator=generator,
            )  # fmt: skip
        else:
            out["local_crops"] = torch.empty(0, device=pixels.device)
        if return_params:
            out["params"] = params
        return out

    def _group(
        self,
        pixels: Tensor,
        num_views: int,
        size: int,
        scale: Sequence[float],
        blur_p: Sequence[float],
        solarize_p: Sequence[float],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``num_views`` crops of every image: cut, flip, colour, blur, solarize, normalise."""
        c = self.cfg
        batch, _, height, width = pixels.shape
        device = pixels.device
        n = num_views * batch
        boxes = random_resized_crop_boxes(n, height, width, scale, RATIO, generator, device)
        u = uniform((n, 6), generator, device)

        def per_view(column: int, probabilities: Sequence[float]) -> Tensor:
            views = u[:, column].view(num_views, batch)
            return torch.cat([views[v] < p for v, p in enumerate(probabilities)])

        flip = u[:, 0] < c.hflip_p
        jitter = u[:, 1] < c.color_jitter_p
        gray = u[:, 2] < c.grayscale_p
        blur = per_view(3, blur_p)
        sol = per_view(4, solarize_p)
        sigma = c.blur_sigma[0] + (c.blur_sigma[1] - c.blur_sigma[0]) * u[:, 5]
        jitter_draws = jitter_params(n, c, generator, device)

        supersample = supersample_factor(height, width, size, scale) if self.antialias else 1
        grid = crop_grid(boxes, flip, height, width, size, num_views, supersample)
        x = resample_crops(pixels, grid, num_views, size, supersample, self.interpolation)
        x = color_jitter(x, jitter, jitter_draws, c)
        if c.grayscale_p > 0:
            x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        if max(blur_p) > 0:
            kernel = blur_kernel_size(size, max(c.blur_sigma), c.blur_as_released)
            x = torch.where(blur.view(-1, 1, 1, 1), gaussian_blur(x, sigma, kernel), x)
        if max(solarize_p) > 0:
            x = torch.where(sol.view(-1, 1, 1, 1), solarize(x, c.solarize_threshold), x)
        x = torch.cat([(x[:, i : i + 1] - c.mean[i]) / c.std[i] for i in range(3)], dim=1).to(self.out_dtype)
        params = {
            "boxes": boxes, "flip": flip, "jitter": jitter, "grayscale": gray,
            "blur": blur, "sigma": sigma, "solarize": sol,
            **{f"jitter_{k}": v for k, v in jitter_draws.items()},
        }  # fmt: skip
        return x, params
