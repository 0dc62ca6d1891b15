"""Resampling a learned position embedding to another patch grid, as each library does it.

The same weights give different features at another input size depending on how the ``M × M`` grid
of position embeddings is resized to ``h × w`` (all bicubic, ``align_corners=False``, in float32):

- ``reference``: facebookresearch/dinov2 ``DinoVisionTransformer.interpolate_pos_encoding``
  (``dinov2/models/vision_transformer.py:180-212``) with its defaults ``interpolate_offset=0.1``,
  ``interpolate_antialias=False`` (``:67-68``; the training config's ``student.interpolate_offset`` /
  ``interpolate_antialias``, ``dinov2/configs/ssl_default_config.yaml:84-85``; the released torch.hub models
  without registers, ``hub/backbones.py:27-28``): ``scale_factor=((h + 0.1) / M, (w + 0.1) / M)``, so
  the output is ``h × w`` but the source coordinates are scaled by ``M / (h + 0.1)``, no antialias;
- ``reference_reg``: the released ``*_reg`` torch.hub models (``hub/backbones.py:107-108``,
  ``interpolate_antialias=True, interpolate_offset=0.0``): ``size=(h, w)``, antialias;
- ``hf``: transformers' ``Dinov2Embeddings.interpolate_pos_encoding``: ``size=(h, w)``, no antialias;
- ``timm``: ``timm.layers.resample_abs_pos_embed`` (dynamic image size and checkpoint resizing):
  ``size=(h, w)``, antialias;
- ``ours``: what this project did before the reference mode existed: ``size=(h, w)``, antialias.

``reference_reg``, ``timm`` and ``ours`` compute the same numbers today; they are separate names so
that a setting says whose behaviour it is meant to match. Every mode returns the embedding unchanged
on its own grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov2.config import PosEmbedInterpolation

#: dinov2's historical offset (``vision_transformer.py:196-200``; facebookresearch/dino issue #8)
REFERENCE_OFFSET = 0.1


def interpolate_pos_embed(pos_embed: Tensor, h: int, w: int, mode: PosEmbedInterpolation | str) -> Tensor:
    """``pos_embed`` ``(1, 1 + M*M, D)`` (class position first) for an ``h × w`` patch grid, ``(1, 1 + h*w, D)``."""
    mode = PosEmbedInterpolation(mode)
    grid_len = pos_embed.shape[1] - 1
    m = round(grid_len**0.5)
    if m * m != grid_len:
        raise ValueError(f"pos_embed has {grid_len} patch positions, not a square grid")
    if (h, w) == (m, m):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    grid = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    if mode == PosEmbedInterpolation.reference:
        scale = ((h + REFERENCE_OFFSET) / m, (w + REFERENCE_OFFSET) / m)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False, align_corners=False)
        if grid.shape[-2:] != (h, w):  # the reference asserts the same (vision_transformer.py:210)
            raise ValueError(f"offset interpolation gave a {tuple(grid.shape[-2:])} grid, not {(h, w)}")
    else:
        antialias = mode != PosEmbedInterpolation.hf
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias, align_corners=False)
    grid = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return torch.cat([cls_pos, grid], dim=1)
