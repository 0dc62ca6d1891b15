"""DINOv2 multi-crop augmentation of whole ``uint8`` batches on the device, and a training stream using it.

The CPU pipeline (:mod:`dinov2.data.augmentations`) augments one PIL image at a time in loader
workers; thousands of images per second times ten crops is more than a few CPU cores can do. Here the
same augmentation runs on a ``uint8`` batch that is already on the device, with batched tensor ops
only (no Python loop over samples), from the same :class:`~dinov2.config.CropsConfig`. Per crop:

1. **random resized crop**: torchvision's rule, vectorised — up to 10 attempts of an area fraction
   ``~ U(scale)`` and a log-uniform aspect ratio in ``[3/4, 4/3]``, rounded to an integer box that
   must fit (the first that fits wins), else the central fall-back box — then the box is resampled to
   the crop size for the whole batch by **one** ``grid_sample`` call per crop group (bicubic by
   default, as the CPU path; or bilinear). When the crops can shrink the image by ≥ 1.5×, the grid is
   supersampled and box-averaged (an approximate antialias filter; the CPU path antialiases exactly);
2. **horizontal flip** with ``hflip_p``, folded into the sampling grid;
3. **colour jitter** with ``color_jitter_p``: brightness, contrast, saturation and hue factors drawn
   as torchvision does, applied in a random order per crop. Hue is shifted through **RGB ↔ HSV**
   (the same colour space as torchvision, not a YIQ rotation);
4. **grayscale** with ``grayscale_p`` (ITU-R 601 luma weights, repeated on 3 channels);
5. **Gaussian blur** with ``blur_p_global1`` / ``blur_p_global2`` / ``blur_p_local`` per view (inverted
   with ``blur_as_released``, as the CPU path), ``σ ~ U(blur_sigma)`` per crop, the CPU path's kernel
   size, reflect padding; separable, one grouped
   convolution per direction for the whole group;
6. **solarize** on the second global crop only, with ``solarize_p_global2``: ``x ≥ threshold → 1 − x``;
7. **normalize** with ``mean`` / ``std``.

Every random draw comes from one ``torch.Generator`` on the batch's device, seeded per batch from
``(seed, position of the batch's first sample)``, so a batch is a function of its place in the stream
(on a given device type: CPU and CUDA generators draw different numbers from the same seed).

Differences from the CPU path, all deliberate: pixels stay float in ``[0, 1]`` between the colour
steps (the CPU path truncates to ``uint8`` after each one); resampling is ``grid_sample``'s bicubic (or
bilinear) — equal to ``torch.nn.functional.interpolate`` of the cut box inside it, but the outermost
output pixels read the image just outside the box where cut-then-resize clamps to the box's edge —
rather than PIL's, and its antialiasing is approximate; the random numbers differ (same distributions).

:class:`GPUTrainLoader` (built by :func:`build_gpu_train_loader` for ``data.pipeline=gpu``) is the
device counterpart of :class:`~dinov2.data.loader.TrainLoader`: the same :class:`InfiniteSampler`
stream and the same iBOT masks (same generator seeds, computed on the CPU — optionally in worker
processes — and copied over), batches with the keys of :func:`~dinov2.data.collate.collate_multicrop`,
and the dataset decoded once into device memory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinov2.data.augmentations import blur_kernel_size, blur_probabilities
from dinov2.data.collate import mask_tensors
from dinov2.data.masking import sample_masks
from dinov2.data.samplers import InfiniteSampler
from dinov2.data.seeding import STREAM_MASKS, derive_seed, numpy_rng

if TYPE_CHECKING:
    from dinov2.config import CropsConfig, DataConfig, MaskConfig
    from dinov2.data.base import ImageDataset

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of torchvision's RandomResizedCrop (the CPU path's)
CROP_ATTEMPTS = 10  # torchvision's number of tries before the central fall-back box
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
INTERPOLATIONS = ("bicubic", "bilinear")
STREAM_GPU_AUGMENTATION = 5  # seed stream of the per-batch device generator (next to dinov2.data.seeding's)


# ------------------------------------------------------------------------------------------ helpers
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


def device_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def batch_generator(device: torch.device | str, seed: int, first_position: int) -> torch.Generator:
    """The augmentation generator of the batch whose first sample sits at ``first_position``."""
    return device_generator(device, derive_seed(seed, STREAM_GPU_AUGMENTATION, first_position))


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


# ------------------------------------------------------------------------------- random resized crop
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
    u = _rand((n, CROP_ATTEMPTS, 4), generator, device)
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
    n = boxes.shape[0]
    batch = n // num_views
    t = (torch.arange(s, device=boxes.device, dtype=boxes.dtype) + 0.5) / s
    top, left, h, w = boxes.unbind(1)
    tx = torch.where(flips[:, None], 1.0 - t, t)
    x = (left[:, None] + tx * w[:, None]) * (2.0 / width) - 1.0  # (n, s)
    y = (top[:, None] + t * h[:, None]) * (2.0 / height) - 1.0
    grid = torch.stack([x[:, None, :].expand(n, s, s), y[:, :, None].expand(n, s, s)], dim=-1)
    return grid.reshape(num_views, batch, s, s, 2).transpose(0, 1).reshape(batch, num_views * s, s, 2)


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


# ------------------------------------------------------------------------------------ colour ops
def grayscale(x: Tensor) -> Tensor:
    """Luma ``(N, 1, H, W)`` of RGB ``(N, 3, H, W)``."""
    wr, wg, wb = GRAY_WEIGHTS
    return wr * x[:, 0:1] + wg * x[:, 1:2] + wb * x[:, 2:3]


def blend(x: Tensor, other: Tensor | float, factor: Tensor) -> Tensor:
    """``clamp(f·x + (1 − f)·other, 0, 1)`` with one factor per image (``f = 1`` is the identity)."""
    f = factor.view(-1, 1, 1, 1).to(x.dtype)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return blend(x, 0.0, factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return blend(x, grayscale(x), factor)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB ``(N, 3, H, W)`` in [0, 1] → HSV with hue in [0, 1)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    value = x.amax(dim=1, keepdim=True)
    delta = value - x.amin(dim=1, keepdim=True)
    saturation = torch.where(value > 0, delta / torch.where(value > 0, value, 1.0), 0.0)
    safe = torch.where(delta > 0, delta, 1.0)
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, torch.remainder(hue / 6.0, 1.0), 0.0)
    return torch.cat([hue, saturation, value], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """HSV ``(N, 3, H, W)`` (hue in [0, 1)) → RGB: channel ``c = V − V·S·clamp(min(k, 4 − k), 0, 1)``
    with ``k = (n_c + 6·H) mod 6`` and ``n = (5, 3, 1)`` for R, G, B."""
    hue, saturation, value = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    k = torch.remainder(torch.cat([5.0 + 6.0 * hue, 3.0 + 6.0 * hue, 1.0 + 6.0 * hue], dim=1), 6.0)
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` (fraction of a turn, one per image) in HSV."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0:1] + shift.view(-1, 1, 1, 1).to(x.dtype), 1.0)
    return hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1))


def jitter_params(
    n: int, cfg: CropsConfig, generator: torch.Generator | None, device: torch.device
) -> dict[str, Tensor]:
    """Per-image draws of torchvision's ``ColorJitter``: ``brightness``, ``contrast``, ``saturation``
    factors ``~ U(max(0, 1 − a), 1 + a)``, a ``hue`` shift ``~ U(−h, h)``, and ``order (n, 4)``, a random
    permutation of the operations (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    u = _rand((n, 8), generator, device)

    def factor(column: int, amount: float) -> Tensor:
        low, high = max(0.0, 1.0 - amount), 1.0 + amount
        return low + (high - low) * u[:, column]

    return {
        "brightness": factor(0, cfg.brightness),
        "contrast": factor(1, cfg.contrast),
        "saturation": factor(2, cfg.saturation),
        "hue": cfg.hue * (2.0 * u[:, 3] - 1.0),
        "order": u[:, 4:].argsort(dim=1),
    }


def color_jitter(x: Tensor, apply: Tensor, params: dict[str, Tensor], cfg: CropsConfig) -> Tensor:
    """torchvision's ``ColorJitter`` on the images where ``apply``, with :func:`jitter_params` draws.

    Batched as four slots: in slot ``i`` every operation runs with its identity factor except, per
    image, operation ``order[:, i]``, which runs with that image's factor. Operations whose strength is
    0 in ``cfg`` are skipped (as torchvision skips them)."""
    ops = [
        (cfg.brightness, adjust_brightness, params["brightness"]),
        (cfg.contrast, adjust_contrast, params["contrast"]),
        (cfg.saturation, adjust_saturation, params["saturation"]),
    ]
    one = torch.ones_like(params["hue"])
    for slot in range(4):
        chosen = params["order"][:, slot]
        for op, (amount, adjust, factor) in enumerate(ops):
            if amount > 0:
                x = adjust(x, torch.where(apply & (chosen == op), factor, one))
        if cfg.hue > 0:
            x = torch.where((apply & (chosen == 3)).view(-1, 1, 1, 1), adjust_hue(x, params["hue"]), x)
    return x


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


def solarize(x: Tensor, threshold: float) -> Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


# ------------------------------------------------------------------------------------ the pipeline
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
        u = _rand((n, 6), generator, device)

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


# --------------------------------------------------------------------------------------- collate
def batch_masks(
    num_global_crops: int, grid: tuple[int, int], mask_cfg: MaskConfig, rng: np.random.Generator | None
) -> dict[str, Any]:
    """iBOT masks of a batch on the CPU, drawn exactly as ``collate_multicrop`` draws them (the same
    generator gives the same masks), in :func:`~dinov2.data.collate.mask_tensors` form."""
    masks = sample_masks(
        num_global_crops,
        grid,
        mask_probability=mask_cfg.mask_probability,
        ratio_min_max=tuple(mask_cfg.mask_ratio_min_max),
        generator=rng,
        min_num_patches=mask_cfg.min_num_patches,
        aspect_ratio=tuple(mask_cfg.aspect_ratio_min_max),
    )
    return mask_tensors(torch.from_numpy(masks).flatten(1))


def collate_gpu(
    images: Tensor,
    positions: Tensor,
    labels: Tensor | None,
    augment: GPUMultiCrop,
    mask_cfg: MaskConfig,
    patch_size: int,
    seed: int = 0,
    masks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A training batch from a ``uint8`` image batch on the device, with the keys of
    :func:`~dinov2.data.collate.collate_multicrop` (``global_crops``, ``local_crops``, ``masks``,
    ``mask_indices``, ``n_masked_patches``, ``mask_weights``, ``labels``, ``positions``,
    ``num_skipped = 0``, ``skipped_paths = []``), every tensor on the images' device.

    ``positions`` (a CPU tensor or sequence) are the samples' stream positions: the first one seeds
    the augmentation generator and, unless ``masks`` (from :func:`batch_masks`) are given, the masks
    — with the CPU path's seed, so both pipelines mask a batch identically.
    """
    device = images.device
    positions = torch.as_tensor(positions, dtype=torch.long)
    first = int(positions[0])
    crops = augment(images, batch_generator(device, seed, first))
    if masks is None:
        size = augment.cfg.global_crops_size
        grid = (size // patch_size, size // patch_size)
        masks = batch_masks(crops["global_crops"].shape[0], grid, mask_cfg, numpy_rng(seed, STREAM_MASKS, first))
    if labels is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.long)
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in masks.items()}
    return {
        "global_crops": crops["global_crops"],
        "local_crops": crops["local_crops"],
        **moved,
        "labels": labels.to(device, torch.long, non_blocking=True),
        "positions": positions.to(device, non_blocking=True),
        "num_skipped": 0,
        "skipped_paths": [],
    }


# ---------------------------------------------------------------------------------- the stream
class _BatchMasks(torch.utils.data.Dataset):
    """Item ``p``: the masks of the batch whose first sample is at stream position ``p``."""

    def __init__(self, num_global_crops: int, grid: tuple[int, int], mask_cfg: MaskConfig, seed: int) -> None:
        self.num_global_crops, self.grid, self.mask_cfg, self.seed = num_global_crops, grid, mask_cfg, seed

    def __getitem__(self, first_position: int) -> dict[str, Any]:
        rng = numpy_rng(self.seed, STREAM_MASKS, first_position)
        return batch_masks(self.num_global_crops, self.grid, self.mask_cfg, rng)


class _Arithmetic(torch.utils.data.Sampler):
    """``start, start + step, …`` forever."""

    def __init__(self, start: int, step: int) -> None:
        self.start, self.step = start, step

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start, self.step)


class GPUTrainLoader:
    """Endless, resumable training batches from images held in device memory, augmented there.

    The counterpart of :class:`~dinov2.data.loader.TrainLoader` (same ``num_skipped``,
    ``skipped_paths``, ``state_dict``/``load_state_dict``): an :class:`InfiniteSampler` stream (so a
    batch holds the same images as the CPU pipeline's batch at that iteration), iBOT masks drawn on
    the CPU with the CPU path's seeds (in ``mask_workers`` processes when > 0, prefetched), and
    :class:`GPUMultiCrop` on the device. ``images``: ``uint8 (N, H, W, 3)`` or ``(N, 3, H, W)``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None,
        crops: CropsConfig,
        masks: MaskConfig,
        patch_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_iteration: int = 0,
        mask_workers: int = 0,
        interpolation: str = "bicubic",
    ) -> None:
        self.images = as_nchw(images)
        self.device = self.images.device
        n = self.images.shape[0]
        self.labels = (
            torch.full((n,), -1, dtype=torch.long, device=self.device)
            if labels is None
            else labels.to(self.device, torch.long)
        )
        self.augment = GPUMultiCrop(crops, interpolation=interpolation)
        self.mask_cfg = masks
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch_size = batch_size * world_size
        self.mask_workers = mask_workers
        self.sampler = InfiniteSampler(
            n, seed=seed, rank=rank, world_size=world_size, start=start_iteration * self.global_batch_size,
            return_positions=True,
        )  # fmt: skip
        self.num_skipped = 0
        self.skipped_paths: set[str] = set()

    def _masks(self, start_position: int) -> Iterator[dict[str, Any]]:
        size = self.augment.cfg.global_crops_size
        dataset = _BatchMasks(2 * self.batch_size, (size // self.patch_size,) * 2, self.mask_cfg, self.seed)
        firsts = _Arithmetic(start_position + self.rank, self.world_size * self.batch_size)
        if self.mask_workers <= 0:
            return (dataset[p] for p in firsts)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=firsts,
            num_workers=self.mask_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = iter(self.sampler)
        masks = self._masks(self.sampler.position)
        while True:
            items = list(itertools.islice(stream, self.batch_size))
            positions = torch.tensor([p for p, _ in items], dtype=torch.long)
            index = torch.tensor([i for _, i in items], dtype=torch.long).to(self.device, non_blocking=True)
            batch = collate_gpu(
                self.images.index_select(0, index), positions, self.labels.index_select(0, index),
                self.augment, self.mask_cfg, self.patch_size, self.seed, masks=next(masks),
            )  # fmt: skip
            self.sampler.advance(self.global_batch_size)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position on the next ``iter()``."""
        self.sampler.load_state_dict(state)


# ------------------------------------------------------------------------------------- decoding
def _square(image: Any, size: int) -> Any:
    """Shorter side to ``size`` (bicubic), then the central ``size × size`` square (PIL)."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def decode_dataset(
    dataset: ImageDataset,
    indices: Sequence[int] | None = None,
    size: int | None = None,
    num_threads: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode ``dataset`` (or its ``indices``) once: ``(uint8 (N, H, W, 3), int64 labels (N,))`` on the CPU.

    Every image must have the same size unless ``size`` is given (then each is resized and centre-
    cropped to ``size × size``). Undecodable records are replaced as the dataset's ``get`` does."""
    indices = range(len(dataset)) if indices is None else indices

    def load(i: int) -> tuple[np.ndarray, int]:
        sample = dataset.get(int(i))
        image = sample.image if size is None else _square(sample.image, size)
        return np.asarray(image, dtype=np.uint8), sample.label

    with ThreadPoolExecutor(max_workers=num_threads) as pool:  # PIL releases the GIL while decoding
        decoded = list(pool.map(load, indices))
    if not decoded:
        raise ValueError(f"{getattr(dataset, 'source', 'dataset')} selects no images")
    shapes = {a.shape for a, _ in decoded}
    if len(shapes) > 1:
        listed = ", ".join(f"{s[1]}x{s[0]}" for s in sorted(shapes)[:3])
        raise ValueError(
            f"the device pipeline needs images of one size, found {len(shapes)} ({listed}, …); "
            "pass size= to resize them, or use data.pipeline=cpu"
        )
    images = torch.from_numpy(np.stack([a for a, _ in decoded]))
    labels = torch.tensor([label for _, label in decoded], dtype=torch.long)
    return images, labels


def build_gpu_train_loader(
    cfg: DataConfig,
    patch_size: int,
    device: torch.device | str,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_iteration: int = 0,
    dataset: ImageDataset | None = None,
) -> GPUTrainLoader:
    """``data.pipeline=gpu``: the dataset decoded once into ``device`` memory and augmented there.

    Same arguments as :func:`~dinov2.data.loader.build_train_loader` plus ``device``; the masks are
    drawn in ``cfg.num_workers`` worker processes."""
    from dinov2.data.datasets import build_dataset

    dataset = build_dataset(cfg.dataset) if dataset is None else dataset
    images, labels = decode_dataset(dataset, num_threads=max(1, cfg.num_workers))
    return GPUTrainLoader(
        images.to(device),
        labels,
        cfg.crops,
        cfg.masks,
        patch_size,
        cfg.batch_size_per_gpu,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_iteration=start_iteration,
        mask_workers=cfg.num_workers,
    )
