"""Datasets whose records are image files: a base directory and one relative (or absolute) path per record,
with an integer label per record (-1: none). The folder and the file-list datasets are two ways of
finding those paths."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from dinov2.data.base import ImageDataset
from dinov2.data.decode import decode_image
from dinov2.data.string_array import StringArray


class ImageFilesDataset(ImageDataset):
    """Record ``i`` is the file ``base_dir / paths[i]``, labelled ``labels[i]``; subclasses set
    ``base_dir``, ``_paths`` and ``labels`` in their constructor."""

    base_dir: str
    _paths: StringArray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.path.join(self.base_dir, self._paths[index])  # join keeps absolute paths as they are

    def load(self, index: int) -> Image.Image:
        return decode_image(self.path(index))

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return self.path(index)
