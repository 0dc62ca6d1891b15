"""Gaussian blur of the multi-crop recipe (issue 13, item 5), CPU and device paths.

- ``data.crops.blur_as_released=true`` is what produced the released DINOv2 weights: the reference's
  ``GaussianBlur(p)`` is ``RandomApply(p=1 - p)`` with a 9-tap kernel (dinov2
  ``dinov2/data/transforms.py:12-21``), so with the recipe's 1.0 / 0.1 / 0.5 (``augmentations.py:73-82``)
  the first global crop is never blurred, the second 0.9 of the time, a local crop half the time;
- otherwise the probabilities are the recipe's as written and the kernel covers ±3σ (13 taps for σ = 2)
  at every crop size (it used to shrink with the crop: 3 taps at 16 px, 5 at 98 px).

Every other operation is switched off and the crops are the whole image, so a crop is either the image
or the image blurred; which one, and by which kernel, is read off the pixels and compared with
torchvision's ``GaussianBlur`` (the reference's transform) applied to the same image.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from dinov2.config import CropsConfig
from dinov2.data.augmentations import MultiCropAugmentation, blur_kernel_size
from dinov2.data.gpu import GPUMultiCrop, device_generator
from dinov2.data.seeding import seeded_torch_rng

SIZE = 16
SIGMA = 2.0


def plain_cfg(**changes) -> CropsConfig:
    """Whole-image crops at the image size, only the blur on (σ fixed), identity normalisation; the
    recipe's blur probabilities (1.0 / 0.1 / 0.5)."""
    base = CropsConfig(
        global_crops_size=SIZE, local_crops_size=SIZE, local_crops_number=2,
        global_crops_scale=[1.0, 1.0], local_crops_scale=[1.0, 1.0], hflip_p=0.0, color_jitter_p=0.0,
        grayscale_p=0.0, solarize_p_global2=0.0, blur_sigma=[SIGMA, SIGMA], mean=[0.0, 0.0, 0.0],
        std=[1.0, 1.0, 1.0],
    )  # fmt: skip
    return replace(base, **changes)


def noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def reference_blur(image: Image.Image, kernel: int) -> torch.Tensor:
    """torchvision's (v1) ``GaussianBlur`` on the PIL image, as the reference applies it, then ``ToTensor``."""
    return T.ToTensor()(T.GaussianBlur(kernel, sigma=(SIGMA, SIGMA))(image))


def classify(crop: torch.Tensor, image: Image.Image, kernel: int) -> bool:
    """True if ``crop`` is ``image`` blurred with ``kernel`` taps, False if it is ``image``; fails otherwise."""
    plain = T.ToTensor()(image)
    if torch.allclose(crop, plain, atol=1e-6):
        return False
    blurred = reference_blur(image, kernel)
    assert torch.allclose(crop, blurred, atol=1e-6), f"neither the image nor its {kernel}-tap blur"
    return True


def blur_rates(cfg: CropsConfig, kernel: int, n: int = 300) -> tuple[float, float, float]:
    augment = MultiCropAugmentation(cfg)
    counts = np.zeros(3)
    for i in range(n):
        image = noise_image(i)
        with seeded_torch_rng(i):
            out = augment(image)
        g1, g2 = (classify(c, image, kernel) for c in out["global_crops"])
        local = np.mean([classify(c, image, kernel) for c in out["local_crops"]])
        counts += (g1, g2, local)
    return tuple(counts / n)  # type: ignore[return-value]


def test_released_blur_inverts_the_probabilities_with_a_9_tap_kernel():
    g1, g2, local = blur_rates(plain_cfg(blur_as_released=True), kernel=9)
    assert g1 == 0.0  # the reference never blurs the first global crop
    assert abs(g2 - 0.9) < 0.06  # binomial sd at n=300: 0.017
    assert abs(local - 0.5) < 0.08  # sd 0.02 (600 local crops)


def test_recipe_blur_keeps_the_probabilities_and_covers_three_sigma():
    assert blur_kernel_size(SIZE, SIGMA) == 13 and blur_kernel_size(98, SIGMA) == 13
    assert blur_kernel_size(224, SIGMA, as_released=True) == blur_kernel_size(98, 0.5, as_released=True) == 9
    assert blur_kernel_size(2, SIGMA) == 3  # the reflect padding stays inside a 2-px crop
    g1, g2, local = blur_rates(plain_cfg(), kernel=13)
    assert g1 == 1.0
    assert abs(g2 - 0.1) < 0.06
    assert abs(local - 0.5) < 0.08


def test_device_path_blurs_as_released():
    n = 400
    batch = torch.from_numpy(np.stack([np.asarray(noise_image(i)) for i in range(n)]))
    cfg = plain_cfg(blur_as_released=True, local_crops_number=1)
    out = GPUMultiCrop(cfg)(batch, device_generator("cpu", 0), return_params=True)
    g, loc = out["params"]["global"], out["params"]["local"]
    assert not g["blur"][:n].any()
    assert abs(g["blur"][n:].float().mean().item() - 0.9) < 0.05
    assert abs(loc["blur"].float().mean().item() - 0.5) < 0.08
    pixels = batch.permute(0, 3, 1, 2).float() / 255
    second = out["global_crops"][n:]
    for i in range(8):
        expected = TF.gaussian_blur(pixels[i], [9, 9], [SIGMA, SIGMA]) if g["blur"][n + i] else pixels[i]
        torch.testing.assert_close(second[i], expected, atol=2e-6, rtol=0)
