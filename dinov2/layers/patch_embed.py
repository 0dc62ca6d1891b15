"""Image → sequence of patch embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` × ``patch_size`` patches, linearly embedded (a strided conv).

    Returns ``(B, h*w, D)`` tokens in row-major patch order; any input size divisible by the patch size
    is accepted (the position embedding is interpolated by the model).
    """

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input size {height}x{width} is not divisible by the patch size {p}")
        return height // p, width // p

    def forward(self, x: Tensor) -> Tensor:
        self.grid(x.shape[-2], x.shape[-1])
        return torch.flatten(self.proj(x), 2).transpose(1, 2)
