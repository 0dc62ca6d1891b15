"""Colour operations on float RGB batches ``(N, 3, H, W)`` in [0, 1], one parameter per image:
torchvision's ``ColorJitter`` (brightness, contrast, saturation, hue through RGB ↔ HSV — the same colour
space as torchvision, not a YIQ rotation — in a random order per image), grayscale and solarize.

Pixels stay float between the steps (the CPU path truncates to ``uint8`` after each one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dinov2.data.gpu.generators import uniform

if TYPE_CHECKING:
    from dinov2.config import CropsConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


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
    u = uniform((n, 8), generator, device)

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


def solarize(x: Tensor, threshold: float) -> Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)
