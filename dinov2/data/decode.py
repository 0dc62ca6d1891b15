"""``decode_image``: the one place an image file becomes an 8-bit RGB picture (training, evaluation, curation).

``Image.convert("RGB")`` is right for the 8-bit modes (1, L, P, RGB, CMYK, YCbCr, …) but not for the
others: it clips 16-bit and 32-bit integer pixels (``I;16``, ``I``) to 255, so a 16-bit PNG becomes an
all-white picture, and it drops the alpha channel of ``LA`` / ``RGBA`` / transparent ``P`` images,
showing whatever colour the fully transparent pixels happen to store. Here:

- ``I;16`` (and its byte-order variants): ``value / 257`` rounded, so 0 → 0 and 65535 → 255 exactly;
- ``I`` (32-bit integers) and ``F`` (32-bit floats): by the range the values fit in — ``F`` in [0, 1]
  is ×255, values in [0, 255] are kept, integers in [0, 65535] are / 257, anything else is scaled from
  its own minimum and maximum;
- alpha (``LA``, ``RGBA``, ``PA``, ``P`` with a transparent index, premultiplied ``La`` / ``RGBa``):
  composited over a white background, as an image viewer shows it.

Grey modes become three equal channels. Decoding is complete when the function returns (``load``
forces it), so a truncated file raises here, where the dataset counts it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
BACKGROUND = (255, 255, 255)  # what transparent pixels become


def wide_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """8-bit grey levels of the pixels of a 16-bit, 32-bit integer or float image (see the module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    if mode in _SIXTEEN_BIT:
        scaled = values / 257.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif low >= 0.0 and high <= 255.0:
            scaled = values
        elif mode != "F" and low >= 0.0 and high <= 65535.0:
            scaled = values / 257.0
        else:
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` (any PIL mode) as 8-bit RGB (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return Image.fromarray(wide_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    if mode in _ALPHA or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(source) -> Image.Image:
    """Fully decode a file path or binary file object to an 8-bit RGB image (raises on any defect)."""
    with Image.open(source) as image:
        image.load()  # the full decode, so truncation shows here
        return to_rgb(image)
