"""DINOv2 multi-crop augmentation with ``torchvision.transforms.v2``.

Two global crops and N local crops per image. Each crop is cut and resized (bicubic) and maybe
flipped on the 8-bit image, then colour-jittered, maybe turned grey, blurred and (second global
crop only) maybe solarized on 8-bit tensors, and only then converted to normalised float. The
blur probabilities differ per view, as in the recipe: always on the first global crop, rarely on
the second, half the time on local crops. Every parameter comes from :class:`CropsConfig`.

``data.crops.blur_as_released=true`` reproduces instead what produced the released DINOv2 weights:
the reference's ``GaussianBlur(p)`` is a ``RandomApply`` with probability ``1 - p`` (dinov2
``dinov2/data/transforms.py:12-21``), so with the recipe's 1.0 / 0.1 / 0.5 (``augmentations.py:73-82``)
the first global crop is never blurred, the second 0.9 of the time, local crops half the time, all
with a 9-tap kernel at every crop size. Otherwise the kernel covers ±3σ of the largest σ
(13 taps for σ ≤ 2) at every crop size: a blur is in pixels, whatever the crop's size.

The transforms draw from torch's global RNG; the training pipeline scopes and seeds it per sample
(see ``augmented.py``), so the crops are a function of the sample's position in the stream.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from dinov2.config import CropsConfig


#: the reference's kernel size at every crop size (dinov2 ``dinov2/data/transforms.py:20``)
RELEASED_BLUR_KERNEL = 9


def blur_kernel_size(crop_size: int, sigma_max: float, as_released: bool = False) -> int:
    """The odd Gaussian kernel size: 9 taps ``as_released``, else enough to cover ±3·``sigma_max``.
    Either way at most ``2 * crop_size - 1`` (the reflect padding must stay inside the crop; only
    crops under 5 px are affected, where the reference fails)."""
    k = RELEASED_BLUR_KERNEL if as_released else 2 * math.ceil(3 * sigma_max) + 1
    return max(1, min(k, 2 * crop_size - 1))


def blur_probabilities(cfg: CropsConfig) -> tuple[float, float, float]:
    """The probabilities that the first global, the second global and a local crop are blurred:
    ``blur_p_*`` as set, or ``1 - blur_p_*`` with ``blur_as_released`` (the reference's inversion)."""
    ps = (cfg.blur_p_global1, cfg.blur_p_global2, cfg.blur_p_local)
    return tuple(1.0 - p for p in ps) if cfg.blur_as_released else ps  # type: ignore[return-value]


class MultiCropAugmentation:
    """``image -> {"global_crops": [2 × (3, G, G)], "local_crops": [N × (3, L, L)]}`` float tensors."""

    def __init__(self, cfg: CropsConfig):
        # imported here: torchvision is slow to import
        from torchvision.transforms import GaussianBlur, v2

        self.cfg = cfg
        self.local_crops_number = cfg.local_crops_number

        def crop(size: int, scale: list[float]) -> v2.Transform:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(
                        size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
                    ),
                    v2.RandomHorizontalFlip(p=cfg.hflip_p),
                    v2.ToImage(),  # PIL -> uint8 tensor; the colour operations below work on uint8
                ]
            )

        def colour(size: int, blur_p: float, solarize_p: float = 0.0) -> v2.Transform:
            jitter = v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
            kernel = blur_kernel_size(size, max(cfg.blur_sigma), cfg.blur_as_released)
            # torchvision's v1 GaussianBlur, the reference's class: v2's rounds exact .5 ties of uint8 pixels
            # the other way (one level, rarely: once in 1200 crops of 16 px); the same σ draw from the global RNG
            blur = GaussianBlur(kernel, sigma=tuple(cfg.blur_sigma))
            return v2.Compose(
                [
                    v2.RandomApply([jitter], p=cfg.color_jitter_p),
                    v2.RandomGrayscale(p=cfg.grayscale_p),
                    v2.RandomApply([blur], p=blur_p),
                    v2.RandomSolarize(threshold=cfg.solarize_threshold * 255, p=solarize_p),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
                    v2.ToPureTensor(),
                ]
            )

        self.global_crop = crop(cfg.global_crops_size, cfg.global_crops_scale)
        self.local_crop = crop(cfg.local_crops_size, cfg.local_crops_scale)
        blur_global1, blur_global2, blur_local = blur_probabilities(cfg)
        self.global1_colour = colour(cfg.global_crops_size, blur_global1)
        self.global2_colour = colour(cfg.global_crops_size, blur_global2, cfg.solarize_p_global2)
        self.local_colour = colour(cfg.local_crops_size, blur_local)

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor]]:
        global_crops = [
            self.global1_colour(self.global_crop(image)),
            self.global2_colour(self.global_crop(image)),
        ]
        local_crops = [self.local_colour(self.local_crop(image)) for _ in range(self.local_crops_number)]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(global={self.cfg.global_crops_size}px×2 scale={self.cfg.global_crops_scale}, "
            f"local={self.cfg.local_crops_size}px×{self.local_crops_number} scale={self.cfg.local_crops_scale})"
        )
