"""Last-layer CLS attention maps per head, and PNG overlays of them (the DINO visualization).

:func:`attention_maps` asks the backbone for the last block's attention probabilities, computed
explicitly (``backbone.last_self_attention``; fused attention kernels never materialize them), and
keeps the CLS query's row restricted to the patch keys: ``(B, heads, h, w)``. The values are the raw
softmax probabilities, so each map sums to at most 1 (the rest went to CLS and register tokens).
:func:`top_mass_mask` keeps, per map, the most-attended patches that together hold a given fraction
of the map's mass (DINO shows 60 %).

:func:`save_attention_overlays` writes one PNG grid: a row per image; columns the image, each head's
map upsampled and blended over the image through a colormap, and the mean over heads, each column named
in a header row (``image``, ``head 0`` …, ``mean``). matplotlib is
used for the colormap when it is installed (imported only here); otherwise a built-in ramp is used.
The grid itself is composed with numpy and Pillow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

# Anchor colours of the fallback colormap (dark → purple → orange → pale yellow), RGB in [0, 1].
_FALLBACK_RAMP = np.array(
    [[0.0, 0.0, 0.02], [0.35, 0.05, 0.45], [0.8, 0.2, 0.25], [0.98, 0.6, 0.05], [0.99, 1.0, 0.65]],
    dtype=np.float32,
)


def attention_maps(backbone: nn.Module, images: Tensor, top_mass: float | None = None) -> Tensor:
    """CLS→patch attention of the last block, ``(B, heads, h, w)`` float32 on the CPU.

    ``images`` are normalized ``(B, 3, H, W)`` tensors; they are cropped at the bottom/right to a
    multiple of the patch size. With ``top_mass`` (e.g. 0.6), entries outside :func:`top_mass_mask`
    are set to zero. The backbone runs in eval mode and gets its training mode back.
    """
    p = backbone.patch_size
    h, w = images.shape[-2] // p, images.shape[-1] // p
    if h == 0 or w == 0:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} are smaller than one {p}px patch")
    images = images[..., : h * p, : w * p]
    device = next(backbone.parameters()).device
    first_patch = 1 + backbone.num_register_tokens
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            attn = backbone.last_self_attention(images.to(device))  # (B, heads, N, N)
    finally:
        backbone.train(was_training)
    maps = attn[:, :, 0, first_patch:].float().reshape(attn.shape[0], attn.shape[1], h, w).cpu()
    if top_mass is not None:
        maps = maps * top_mass_mask(maps, top_mass)
    return maps.clone()  # a normal (not inference-mode) tensor for the caller


def top_mass_mask(maps: Tensor, mass: float = 0.6) -> Tensor:
    """Bool mask of the same shape: per map (last two dims), the fewest highest-valued patches whose
    sum reaches ``mass`` of the map's total."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    flat = maps.flatten(-2)
    values, order = flat.sort(dim=-1, descending=True)
    total = values.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    before = (values.cumsum(dim=-1) - values) / total  # mass of the strictly better patches
    keep_sorted = before < mass
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def colorize(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Values in [0, 1] of any shape → RGB float32 of shape ``(*values.shape, 3)``."""
    values = np.clip(values, 0.0, 1.0)
    try:
        import matplotlib  # optional dependency (extra `curation`); fallback ramp below

        return np.asarray(matplotlib.colormaps[cmap](values)[..., :3], dtype=np.float32)
    except ImportError:
        pos = values * (len(_FALLBACK_RAMP) - 1)
        lo = np.clip(np.floor(pos).astype(np.int64), 0, len(_FALLBACK_RAMP) - 2)
        frac = (pos - lo)[..., None].astype(np.float32)
        return _FALLBACK_RAMP[lo] * (1 - frac) + _FALLBACK_RAMP[lo + 1] * frac


def to_uint8_images(
    images: Tensor | np.ndarray, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 from uint8 ``(B, H, W, 3)`` / ``(B, 3, H, W)``, or from float
    ``(B, 3, H, W)`` that is normalized with ``mean``/``std`` (when given) or else in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images.detach().cpu())
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (B, 3, H, W) or (B, H, W, 3), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return (x.permute(0, 2, 3, 1) if x.shape[1] == 3 and x.shape[-1] != 3 else x).contiguous().numpy()
    x = x.float()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def save_attention_overlays(
    images: Tensor | np.ndarray,
    maps: Tensor,
    path: str | os.PathLike,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    alpha: float = 0.6,
    cmap: str = "inferno",
    interpolation: str = "bilinear",
    panel_size: int = 128,
    gap: int = 2,
    labels: bool = True,
) -> Path:
    """Write the overlay grid for ``images`` (see :func:`to_uint8_images`) and ``maps``
    ``(B, heads, h, w)`` to ``path`` (PNG) and return it.

    Each panel is enlarged by an integer factor to about ``panel_size`` pixels; every map is
    min-max scaled on its own before colouring (like ``imshow``), so the panels show where each
    head looks, not how strongly. ``interpolation`` is ``"nearest"`` (patch blocks) or ``"bilinear"``.
    ``labels`` adds the header row naming the columns (:func:`column_names`).
    """
    rgb = to_uint8_images(images, mean, std)
    b, height, width, _ = rgb.shape
    if maps.ndim != 4 or maps.shape[0] != b:
        raise ValueError(f"maps must be (B={b}, heads, h, w), got {tuple(maps.shape)}")
    scale = max(1, round(panel_size / max(height, width)))
    ph, pw = height * scale, width * scale
    maps = maps.detach().float().cpu()
    maps = torch.cat([maps, maps.mean(dim=1, keepdim=True)], dim=1)  # head mean as the last column
    mode = {"nearest": "nearest", "bilinear": "bilinear"}.get(interpolation)
    if mode is None:
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
    # The maps cover the patch grid, i.e. the image cropped to a multiple of the patch size; stretch
    # them over that area (the whole image when it divides evenly).
    up = F.interpolate(maps, size=(ph, pw), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    low = up.flatten(2).amin(dim=2)[..., None, None]
    span = (up.flatten(2).amax(dim=2)[..., None, None] - low).clamp_min(1e-12)
    up = ((up - low) / span).numpy()
    columns = 1 + maps.shape[1]
    header = HEADER_HEIGHT if labels else 0
    canvas = np.full((header + b * ph + (b - 1) * gap, columns * pw + (columns - 1) * gap, 3), 255, dtype=np.uint8)
    for i in range(b):
        base = np.repeat(np.repeat(rgb[i], scale, axis=0), scale, axis=1).astype(np.float32) / 255.0
        panels = [base] + [(1 - alpha) * base + alpha * colorize(up[i, j], cmap) for j in range(maps.shape[1])]
        top = header + i * (ph + gap)
        for j, panel in enumerate(panels):
            left = j * (pw + gap)
            canvas[top : top + ph, left : left + pw] = np.clip(panel * 255 + 0.5, 0, 255).astype(np.uint8)
    picture = Image.fromarray(canvas)
    if labels:
        draw = ImageDraw.Draw(picture)
        for j, name in enumerate(column_names(maps.shape[1] - 1)):
            draw.text((j * (pw + gap) + 2, 2), name, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


HEADER_HEIGHT = 14  # pixels of the header row that names the columns


def column_names(num_heads: int) -> list[str]:
    """The overlay grid's column names: the image, each head, the mean over heads."""
    return ["image"] + [f"head {h}" for h in range(num_heads)] + ["mean"]
