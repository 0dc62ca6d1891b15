"""DINOv2 multi-crop augmentation with ``torchvision.transforms.v2``.

Two global crops and N local crops per image. Each crop is cut and resized (bicubic) and maybe
flipped on the 8-bit image, then colour-jittered, maybe turned grey, blurred and (second global
crop only) maybe solarized on 8-bit tensors, and only then converted to normalised float. The
blur probabilities differ per view, as in the recipe: always on the first global crop, rarely on
the second, half the time on local crops. Every parameter comes from :class:`CropsConfig`.

The transforms draw from torch's global RNG; the training pipeline scopes and seeds it per sample
(see ``augmented.py``), so the crops are a function of the sample's position in the stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from dinov2.config import CropsConfig


def blur_kernel_size(crop_size: int) -> int:
    """An odd Gaussian kernel size that scales with the crop: 9 at 224 px, never below 3."""
    k = max(3, round(crop_size * 9 / 224))
    return k if k % 2 else k + 1


class MultiCropAugmentation:
    """``image -> {"global_crops": [2 × (3, G, G)], "local_crops": [N × (3, L, L)]}`` float tensors."""

    def __init__(self, cfg: CropsConfig):
        from torchvision.transforms import v2  # imported here: torchvision is slow to import

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
            blur = v2.GaussianBlur(blur_kernel_size(size), sigma=tuple(cfg.blur_sigma))
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
        self.global1_colour = colour(cfg.global_crops_size, cfg.blur_p_global1)
        self.global2_colour = colour(cfg.global_crops_size, cfg.blur_p_global2, cfg.solarize_p_global2)
        self.local_colour = colour(cfg.local_crops_size, cfg.blur_p_local)

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
