"""Encoded images concatenated into one byte blob, with offsets (e.g. the CIFAR-10 JPEG copies).

Layout of a split ``S`` in folder ``root``: ``S_jpeg.npy`` (uint8, 1-D, every file's bytes end to
end), ``S_jpeg_offsets.npy`` (int64, N+1: image ``i`` is ``blob[off[i]:off[i+1]]``) and, optionally,
``S_y.npy`` (N integer labels). The blob is memory-mapped, so workers share it without copies.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from dinov2.data.base import ImageDataset, require_path
from dinov2.data.decode import decode_image


class BlobDataset(ImageDataset):
    """Split ``split`` of a blobs folder, optionally restricted to ``subset_idx`` (indices into it)."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        subset_idx: np.ndarray | None = None,
        *,
        max_bad_fraction: float = 0.5,
        min_attempts: int = 20,
    ):
        super().__init__(max_bad_fraction=max_bad_fraction, min_attempts=min_attempts)
        self.root = require_path(root, directory=True)
        self.split = split
        self.source = os.path.join(self.root, f"{split}_jpeg.npy")
        offsets_path = os.path.join(self.root, f"{split}_jpeg_offsets.npy")
        for needed in (self.source, offsets_path):
            if not os.path.isfile(needed):
                raise FileNotFoundError(f"{needed} is missing: {self.root} is not a blobs folder for '{split}'")
        self.blob = np.load(self.source, mmap_mode="r")
        self.offsets = np.load(offsets_path).astype(np.int64)
        labels_path = os.path.join(self.root, f"{split}_y.npy")
        count = len(self.offsets) - 1
        labels = np.load(labels_path) if os.path.isfile(labels_path) else np.full(count, -1)
        self.indices = np.arange(count) if subset_idx is None else np.asarray(subset_idx, dtype=np.int64)
        if len(self.indices) == 0:
            raise ValueError(f"{self.source} selects no images")
        if self.indices.min() < 0 or self.indices.max() >= count:
            raise IndexError(f"subset index out of range for the {count} images of {self.source}")
        self.labels = np.asarray(labels, dtype=np.int64)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def encoded(self, index: int) -> bytes:
        """The encoded file bytes of image ``index``."""
        i = self.indices[index]
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes()

    def load(self, index: int) -> Image.Image:
        return decode_image(io.BytesIO(self.encoded(index)))

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"{self.source}[{int(self.indices[index])}]"


CIFAR10BlobDataset = BlobDataset  # the CIFAR-10 JPEG copies use exactly this layout
