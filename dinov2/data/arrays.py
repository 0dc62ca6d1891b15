"""Images held in memory as one uint8 array ``(N, H, W, 3)``, with optional integer labels."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from dinov2.data.base import ImageDataset, require_path


class ArrayDataset(ImageDataset):
    """``images[i]`` as a PIL image with ``labels[i]`` (or -1 when ``labels`` is None)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, *, source: str = "<arrays>"):
        super().__init__()
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) == 0:
            raise ValueError(f"{source} holds no images")
        if labels is None:
            labels = np.full(len(images), -1, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.source = images, labels, source

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> ArrayDataset:
        """Arrays saved with ``np.savez(path, images=..., labels=...)`` (``labels`` optional)."""
        path = require_path(path, directory=False)
        with np.load(path) as data:
            if "images" not in data:
                raise ValueError(f"{path} has no 'images' array (found: {', '.join(data.files)})")
            labels = data["labels"] if "labels" in data else None
            return cls(data["images"], labels, source=path)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.images[index]))

    def label(self, index: int) -> int:
        return int(self.labels[index])
