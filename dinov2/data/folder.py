"""A folder of images, searched recursively; the first-level sub-folders, if any, are the classes."""

from __future__ import annotations

import os

import numpy as np

from dinov2.data.base import require_path
from dinov2.data.image_files import ImageFilesDataset
from dinov2.data.string_array import StringArray

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def find_images(root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Paths relative to ``root`` of every file with an image extension below it, sorted."""
    found: list[str] = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        rel_dir = os.path.relpath(directory, root)
        for name in sorted(files):
            if name.lower().endswith(extensions) and not name.startswith("."):
                found.append(name if rel_dir == "." else os.path.join(rel_dir, name))
    return found


def labels_from_subfolders(relative_paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """Label = index of the image's first-level sub-folder among the sorted sub-folder names.

    Images directly in the root get -1. With no sub-folders at all, every label is -1 and the
    class list is empty.
    """
    tops = [p.split(os.sep, 1)[0] if os.sep in p else None for p in relative_paths]
    classes = sorted({t for t in tops if t is not None})
    class_index = {name: i for i, name in enumerate(classes)}
    labels = np.array([class_index[t] if t is not None else -1 for t in tops], dtype=np.int64)
    return labels, classes


class ImageFolderDataset(ImageFilesDataset):
    """Every image below ``root``; labelled by first-level sub-folder when images live in some.

    ``classes`` lists the sub-folder names (label ``i`` is ``classes[i]``); it is empty, and every
    label is -1, when the images sit directly in ``root``.
    """

    def __init__(self, root: str | os.PathLike, *, max_bad_fraction: float = 0.5, min_attempts: int = 20):
        super().__init__(max_bad_fraction=max_bad_fraction, min_attempts=min_attempts)
        self.root = self.base_dir = require_path(root, directory=True)
        self.source = self.root
        relative = find_images(self.root)
        if not relative:
            raise ValueError(
                f"no images found under {self.root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.labels, self.classes = labels_from_subfolders(relative)
        self._paths = StringArray(relative)
