"""The behaviour every image dataset shares: decode, skip what cannot be decoded, count, give up.

A subclass says how many records it has, how to open record ``i`` and what to call it in messages.
:meth:`ImageDataset.get` turns that into a sample that is always a decoded RGB image: a record that
fails (missing, truncated, not an image) is logged once with its path, counted, and replaced by the
next record that decodes, so a batch keeps its size and the replacement is the same on every run.
When more than ``max_bad_fraction`` of the records tried so far failed (after ``min_attempts``), the
dataset is almost certainly misconfigured and :meth:`get` raises one clear ``RuntimeError``.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
from PIL import Image

logger = logging.getLogger(__name__)

PATH_CONFIG_KEY = "data.dataset.path"


class Sample(NamedTuple):
    """A decoded record. ``skipped`` names the records that failed before this one was found."""

    image: Image.Image
    label: int
    index: int
    skipped: tuple[str, ...]


def require_path(path: str | os.PathLike, *, directory: bool | None = None, key: str = PATH_CONFIG_KEY) -> str:
    """``path`` as a string, or a one-line ``FileNotFoundError`` naming it and the config ``key``."""
    path = os.fspath(path)
    if not path:
        raise FileNotFoundError(f"no dataset path given; set {key}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}={path!r} does not exist")
    if directory is True and not os.path.isdir(path):
        raise NotADirectoryError(f"{key}={path!r} is not a directory")
    if directory is False and os.path.isdir(path):
        raise IsADirectoryError(f"{key}={path!r} is a directory, expected a file")
    return path


class ImageDataset(torch.utils.data.Dataset):
    """Base class: robust ``get(i)`` over records that subclasses open with :meth:`load`.

    Subclasses implement ``__len__``, ``load(i) -> PIL.Image`` (RGB), ``label(i) -> int`` (-1 when
    unlabelled) and ``describe(i) -> str`` (the path, for messages), and set ``source`` (the dataset
    path, for messages). The counters are per process: with DataLoader workers, the skipped records
    travel inside each sample instead (see ``Sample.skipped`` and the collate function).
    """

    source: str = "<dataset>"

    def __init__(self, *, max_bad_fraction: float = 0.5, min_attempts: int = 20):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_attempts = min_attempts
        self.num_attempts = 0  # records tried in this process
        self.num_skipped = 0  # records that failed in this process (a record can fail repeatedly)
        self._bad_indices: set[int] = set()  # known-bad records: not decoded again, warned once

    # ------------------------------------------------------------------ to implement in subclasses
    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def label(self, index: int) -> int:
        return -1

    def describe(self, index: int) -> str:
        return f"{self.source}[{index}]"

    # ------------------------------------------------------------------ shared behaviour
    @property
    def skipped_paths(self) -> list[str]:
        """The records that failed to decode in this process, sorted by index."""
        return [self.describe(i) for i in sorted(self._bad_indices)]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        sample = self.get(index)
        return sample.image, sample.label

    def get(self, index: int) -> Sample:
        """Record ``index``, or the first decodable record after it (wrapping around)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        skipped: list[str] = []
        for offset in range(n):
            i = (index + offset) % n
            image = self._try_load(i)
            if image is not None:
                return Sample(image, self.label(i), i, tuple(skipped))
            skipped.append(self.describe(i))
        raise RuntimeError(f"none of the {n} images under {self.source} could be decoded")

    def _try_load(self, index: int) -> Image.Image | None:
        self.num_attempts += 1
        if index not in self._bad_indices:
            try:
                return self.load(index)
            except Exception as error:  # any defect of one file must not stop the run
                self._bad_indices.add(index)
                logger.warning(
                    "skipping unreadable image %s (%s: %s)", self.describe(index), type(error).__name__, error
                )
        self.num_skipped += 1
        self._check_bad_fraction()
        return None

    def _check_bad_fraction(self) -> None:
        attempts, failed = self.num_attempts, self.num_skipped
        if attempts >= self.min_attempts and failed > self.max_bad_fraction * attempts:
            raise RuntimeError(
                f"{failed} of {attempts} images failed to decode under {self.source}; "
                f"check the dataset path/format ({PATH_CONFIG_KEY}, data.dataset.kind)"
            )
