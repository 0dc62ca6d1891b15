"""``build_dataset``: the dataset a :class:`DatasetConfig` names.

Kinds: ``folder`` (recursive image folder), ``filelist`` (.txt/.csv list), ``manifest`` (curation
output), ``arrays`` (.npz with ``images`` and optional ``labels``), ``demo`` (drawn on the fly) and
``blobs`` / ``cifar10_blobs`` (byte blobs + offsets), ``shards`` (webdataset-layout tar shards, see
:mod:`dinov2.data.shards`). ``{split}`` in ``path`` or ``subset_path`` is
replaced by the split, so one config serves the train and the evaluation split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dinov2.data.arrays import ArrayDataset
from dinov2.data.base import ImageDataset, require_path
from dinov2.data.blobs import BlobDataset
from dinov2.data.demo import DemoDataset
from dinov2.data.filelist import FileListDataset
from dinov2.data.folder import ImageFolderDataset
from dinov2.data.manifest import ManifestDataset
from dinov2.data.shards import ShardDataset

if TYPE_CHECKING:
    from dinov2.config import DatasetConfig

DATASET_KINDS = ("folder", "filelist", "manifest", "arrays", "demo", "blobs", "cifar10_blobs", "shards")


def build_dataset(cfg: DatasetConfig, split: str | None = None) -> ImageDataset:
    """The dataset of ``cfg`` for ``split`` (default ``cfg.split``); see the module docstring."""
    split = cfg.split if split is None else split
    path = cfg.path.replace("{split}", split)
    robust = {"max_bad_fraction": cfg.max_bad_fraction}
    if cfg.kind == "demo":
        num = {"train": cfg.demo_num_train, "test": cfg.demo_num_test}.get(split)
        return DemoDataset(split, num_samples=num, image_size=cfg.demo_image_size, seed=cfg.demo_seed)
    if cfg.kind == "folder":
        return ImageFolderDataset(path, **robust)
    if cfg.kind == "filelist":
        return FileListDataset(path, **robust)
    if cfg.kind == "manifest":
        return ManifestDataset(path, **robust)
    if cfg.kind == "shards":
        return ShardDataset(path, index_cache_dir=cfg.index_cache_dir, **robust)
    if cfg.kind == "arrays":
        return ArrayDataset.from_npz(path)
    if cfg.kind in ("blobs", "cifar10_blobs"):
        subset = None
        if cfg.subset_path:
            subset_path = cfg.subset_path.replace("{split}", split)
            subset = np.load(require_path(subset_path, directory=False, key="data.dataset.subset_path"))
        return BlobDataset(path, split, subset, **robust)
    raise ValueError(f"unknown data.dataset.kind {cfg.kind!r}; expected one of {', '.join(DATASET_KINDS)}")
