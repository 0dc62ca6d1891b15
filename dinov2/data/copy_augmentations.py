"""Near-copy transforms: what a re-posted copy of an image looks like.

A copy on the web is the same photo cropped, mirrored, re-encoded as JPEG, colour-edited, slightly
rotated or stamped with a caption. Each transform here takes an RGB PIL image and a
``numpy.random.Generator`` and returns an RGB image **of the same size** (a crop or a rotation is
resized back), so that a copy goes through exactly the preprocessing its original goes through.
Strengths are drawn uniformly from the ranges of :class:`dinov2.config.CopyAugmentConfig`.

Two users:

* ``dinov2-curate calibrate`` plants copies of one *kind* each (:func:`make_copy`): one transform
  (``crop``, ``flip``, ``jpeg``, ``jitter``, ``rotate``, ``overlay``) or ``combo``, a random set of
  ``combo_size`` different ones, so precision and recall can be reported per kind;
* the copy-detection recipe (``train.objective=copy_detection``) trains on two views of every image,
  each with every listed transform applied independently with probability ``transform_p``
  (:class:`CopyViews`). The two views of an image are a copy pair; every other image is a negative.

Transforms are applied in one fixed order whatever order they are listed in: crop, rotate, flip,
jitter, overlay, then jpeg (a re-encode is the last thing that happens to a re-posted image).
"""

from __future__ import annotations

import functools
import io
import math
import string
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from dinov2.config import CopyKind, CopyTransform

if TYPE_CHECKING:
    from dinov2.config import CopyAugmentConfig, CopyDetectionConfig

COPY_KINDS: tuple[str, ...] = get_args(CopyKind)
#: the single transforms, in the order they are applied
TRANSFORM_ORDER: tuple[str, ...] = ("crop", "rotate", "flip", "jitter", "overlay", "jpeg")
assert set(TRANSFORM_ORDER) == set(get_args(CopyTransform))


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    lo, hi = float(bounds[0]), float(bounds[1])
    return lo if hi <= lo else float(rng.uniform(lo, hi))


def random_crop(image: Image.Image, cfg: CopyAugmentConfig, rng: np.random.Generator) -> Image.Image:
    """A random window holding ``crop_area`` of the area at aspect ``crop_aspect``, resized back (bicubic)."""
    w, h = image.size
    area = _uniform(rng, cfg.crop_area) * w * h
    aspect = math.exp(_uniform(rng, [math.log(cfg.crop_aspect[0]), math.log(cfg.crop_aspect[1])]))
    cw = min(w, max(1, round(math.sqrt(area * aspect))))
    ch = min(h, max(1, round(area / cw)))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return image.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)


def rotate(image: Image.Image, cfg: CopyAugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Rotated by up to ``rotate_degrees`` either way; the largest centred window of the same aspect that
    holds no corner fill is cut out and resized back, so the copy has no black borders."""
    w, h = image.size
    angle = _uniform(rng, [-cfg.rotate_degrees, cfg.rotate_degrees])
    turned = image.rotate(angle, resample=Image.BICUBIC)
    a = math.radians(abs(angle))
    # a centred w*s x h*s window fits inside the rotated w x h image when both of its half-diagonal
    # projections do: s (w cos a + h sin a) <= w and s (w sin a + h cos a) <= h
    s = min(w / (w * math.cos(a) + h * math.sin(a)), h / (w * math.sin(a) + h * math.cos(a)))
    cw, ch = max(1, math.floor(w * s)), max(1, math.floor(h * s))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return turned.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)


def flip(image: Image.Image, cfg: CopyAugmentConfig, rng: np.random.Generator) -> Image.Image:
    """The mirror image (left-right)."""
    return image.transpose(Image.FLIP_LEFT_RIGHT)


def colour_jitter(image: Image.Image, cfg: CopyAugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation scaled by factors in ``[1 - jitter, 1 + jitter]``, hue shifted
    by up to ``hue`` of the colour wheel."""
    j = cfg.jitter
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(_uniform(rng, [1 - j, 1 + j]))
    shift = _uniform(rng, [-cfg.hue, cfg.hue])
    if shift:
        h, s, v = image.convert("HSV").split()
        h = h.point(lambda x: int(x + shift * 255) % 256)
        image = Image.merge("HSV", (h, s, v)).convert("RGB")
    return image


def overlay(image: Image.Image, cfg: CopyAugmentConfig, rng: np.random.Generator) -> Image.Image:
    """A caption of 3–8 random letters and digits (half the time) or a filled box or disc, in a random
    colour at opacity ``overlay_opacity``, ``overlay_size`` of the image height tall, at a random place."""
    w, h = image.size
    size = max(4, round(_uniform(rng, cfg.overlay_size) * h))
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    alpha = round(255 * _uniform(rng, cfg.overlay_opacity))
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if rng.random() < 0.5:
        alphabet = string.ascii_uppercase + string.digits
        text = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=int(rng.integers(3, 9))))
        font = _font(size)
        x0, y0 = int(rng.integers(0, max(1, w // 2))), int(rng.integers(0, max(1, h - size)))
        draw.text((x0, y0), text, font=font, fill=(*colour, alpha))
    else:
        bw, bh = size, max(4, round(size * _uniform(rng, [0.7, 1.4])))
        x0, y0 = int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - bh)))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x0, y0, x0 + bw, y0 + bh), fill=(*colour, alpha))
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` pixels (loaded once per size)."""
    return ImageFont.load_default(size=size)


def jpeg(image: Image.Image, cfg: CopyAugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Re-encoded as JPEG at a quality in ``jpeg_quality`` (4:2:0 chroma subsampling, Pillow's default)."""
    quality = int(rng.integers(int(cfg.jpeg_quality[0]), int(cfg.jpeg_quality[1]) + 1))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


TRANSFORMS: MappingProxyType[str, Callable[[Image.Image, Any, np.random.Generator], Image.Image]] = MappingProxyType(
    {
        "crop": random_crop,
        "rotate": rotate,
        "flip": flip,
        "jitter": colour_jitter,
        "overlay": overlay,
        "jpeg": jpeg,
    }
)


def check_kinds(kinds: Sequence[str], allow_combo: bool = True) -> None:
    """Raise ``ValueError`` naming the valid kinds when one of ``kinds`` is unknown."""
    valid = COPY_KINDS if allow_combo else TRANSFORM_ORDER
    unknown = [k for k in kinds if k not in valid]
    if unknown or not kinds:
        raise ValueError(f"unknown copy transform(s) {unknown or '(none given)'}; choose from {', '.join(valid)}")


def apply_transforms(
    image: Image.Image, names: Sequence[str], cfg: CopyAugmentConfig, rng: np.random.Generator
) -> Image.Image:
    """``image`` (converted to RGB) put through the named transforms in :data:`TRANSFORM_ORDER`."""
    image = image.convert("RGB")
    for name in TRANSFORM_ORDER:
        if name in names:
            image = TRANSFORMS[name](image, cfg, rng)
    return image


def transforms_of_kind(kind: str, cfg: CopyAugmentConfig, rng: np.random.Generator) -> tuple[str, ...]:
    """The transforms a copy of ``kind`` gets: the kind itself, or for ``combo`` ``combo_size`` different ones."""
    if kind != "combo":
        check_kinds([kind])
        return (kind,)
    lo, hi = int(cfg.combo_size[0]), int(cfg.combo_size[1])
    n = int(rng.integers(lo, hi + 1))
    chosen = rng.choice(len(TRANSFORM_ORDER), size=min(n, len(TRANSFORM_ORDER)), replace=False)
    return tuple(TRANSFORM_ORDER[i] for i in sorted(chosen))


def make_copy(image: Image.Image, kind: str, cfg: CopyAugmentConfig, rng: np.random.Generator) -> Image.Image:
    """A near-copy of ``image`` of one kind (see the module docstring), the same size as the image."""
    return apply_transforms(image, transforms_of_kind(kind, cfg, rng), cfg, rng)


class CopyViews:
    """Training transform of the copy-detection recipe: ``image -> {"global_crops": [view0, view1],
    "local_crops": []}`` (the layout of the multi-crop pipeline, so the same collate and loader serve it).

    Each view is the image with every transform of ``cfg.kinds`` applied independently with probability
    ``cfg.transform_p`` (``combo`` is not a training kind: combinations happen by themselves), then
    resized to ``size`` × ``size`` (bicubic) and normalised with ``mean`` / ``std``. Randomness: one
    draw from torch's global generator seeds a numpy generator, so like the multi-crop pipeline a
    sample's views are a function of its stream position (``dinov2.data.augmented``).
    """

    def __init__(self, cfg: CopyDetectionConfig, size: int, mean: Sequence[float], std: Sequence[float]):
        check_kinds(cfg.kinds, allow_combo=False)
        if not 0.0 <= cfg.transform_p <= 1.0:
            raise ValueError(f"copy_detection.transform_p must be in [0, 1], got {cfg.transform_p}")
        self.cfg, self.size = cfg, size
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)

    def view(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        names = [name for name in self.cfg.kinds if rng.random() < self.cfg.transform_p]
        out = apply_transforms(image, names, self.cfg.augment, rng).resize((self.size, self.size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (pixels - self.mean) / self.std

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor]]:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        return {"global_crops": [self.view(image, rng), self.view(image, rng)], "local_crops": []}

    def __repr__(self) -> str:
        return f"CopyViews(size={self.size}, kinds={list(self.cfg.kinds)}, p={self.cfg.transform_p})"
