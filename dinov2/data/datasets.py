"""``build_dataset``: the dataset a :class:`DatasetConfig` names.

Kinds: ``folder`` (recursive image folder), ``filelist`` (.txt/.csv list), ``manifest`` (curation
output), ``arrays`` (.npz with ``images`` and optional ``labels``), ``demo`` (drawn on the fly) and
``blobs`` / ``cifar10_blobs`` (byte blobs + offsets), ``shards`` (webdataset-layout tar shards, see
:mod:`dinov2.data.shards`). ``{split}`` in ``path`` or ``subset_path`` is
replaced by the split, so one config serves the train and the evaluation split; a ``folder`` without
``{split}`` that has a sub-folder named after the split (``/data/photos/train``, ``/data/photos/val``)
reads that sub-folder.

``auto`` (and ``demo`` given a ``path``) reads the path as what it looks like (:func:`resolve_kind`):
``.tar`` / brace patterns / ``::`` → ``shards``, a directory → ``folder``, ``.txt`` / ``.csv`` →
``filelist`` (``manifest`` when the CSV has a ``source`` column), ``.npz`` → ``arrays``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from dinov2.data.arrays import ArrayDataset
from dinov2.data.base import ImageDataset, require_path
from dinov2.data.blobs import BlobDataset
from dinov2.data.demo import DemoDataset
from dinov2.data.filelist import FileListDataset, read_csv_rows
from dinov2.data.folder import IMAGE_EXTENSIONS, ImageFolderDataset
from dinov2.data.manifest import ManifestDataset
from dinov2.data.shards import PATTERN_SEPARATOR, ShardDataset

if TYPE_CHECKING:
    from dinov2.config import DatasetConfig

DATASET_KINDS = ("auto", "folder", "filelist", "manifest", "arrays", "demo", "blobs", "cifar10_blobs", "shards")
SPLIT_KINDS = ("demo", "blobs", "cifar10_blobs")  # kinds whose split selects other images by itself


def guess_kind(path: str) -> str | None:
    """The dataset kind ``path`` looks like (see the module docstring); None when it looks like none."""
    if PATTERN_SEPARATOR in path or path.endswith(".tar") or ("{" in path and ".tar" in path):
        return "shards"
    if os.path.isdir(path):
        return "shards" if not _has_images(path) and any(n.endswith(".tar") for n in os.listdir(path)) else "folder"
    lower = path.lower()
    if lower.endswith(".npz"):
        return "arrays"
    if lower.endswith(".csv"):
        header, _ = read_csv_rows(path) if os.path.isfile(path) else (None, [])
        return "manifest" if header is not None and "source" in header else "filelist"
    if lower.endswith(".txt"):
        return "filelist"
    return None


def _has_images(path: str) -> bool:
    return any(name.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(path) for name in files)


def resolve_kind(cfg: DatasetConfig) -> str:
    """``cfg.kind``, or for ``auto`` / ``demo`` with a path, the kind the path looks like.

    ``auto`` without a path is ``demo`` only if nothing else is possible: it is an error (ValueError)."""
    if cfg.kind == "demo" and not cfg.path:
        return "demo"
    if cfg.kind not in ("auto", "demo"):
        return cfg.kind
    path = cfg.path.replace("{split}", cfg.split)
    if not cfg.path:
        raise ValueError("data.dataset.kind=auto needs data.dataset.path")
    kind = guess_kind(path)
    if kind is None:
        raise ValueError(
            f"data.dataset.path={cfg.path!r}: cannot tell its kind (not a folder, .txt/.csv list, .npz or .tar "
            f"shards); set data.dataset.kind"
        )
    return kind


SPLIT_FOLDERS = ("train", "val", "validation", "test")  # sub-folder names that mark a folder as split


def split_path(cfg: DatasetConfig, split: str) -> str:
    """The path ``build_dataset(cfg, split)`` reads (``{split}`` replaced, a folder's split sub-folder).

    A folder that has split sub-folders but none named ``split`` is an error (FileNotFoundError): reading
    all of it would mix the splits, and their names would become the classes."""
    path = cfg.path.replace("{split}", split)
    if cfg.kind != "folder" or "{split}" in cfg.path or not path or not os.path.isdir(path):
        return path
    if os.path.isdir(os.path.join(path, split)):
        return os.path.join(path, split)
    present = [name for name in SPLIT_FOLDERS if os.path.isdir(os.path.join(path, name))]
    if present:
        raise FileNotFoundError(
            f"{path} has the split sub-folder(s) {', '.join(present)} but no '{split}': name the splits to use "
            f"(dinov2-eval: folder:{path}:{present[0]},{present[-1]}; training: data.dataset.split, eval.test_split)"
        )
    return path


def same_images(cfg: DatasetConfig, split: str, other: DatasetConfig, other_split: str) -> bool:
    """Whether ``build_dataset(cfg, split)`` and ``build_dataset(other, other_split)`` read the same images."""

    def identity(c: DatasetConfig, s: str) -> tuple:
        c = replace(c, kind=resolve_kind(c))
        if c.kind in SPLIT_KINDS:
            return (c.kind, os.path.abspath(c.path) if c.path else "", s, c.subset_path.replace("{split}", s))
        return (c.kind, os.path.abspath(split_path(c, s)), c.subset_path.replace("{split}", s))

    return identity(cfg, split) == identity(other, other_split)


def build_dataset(cfg: DatasetConfig, split: str | None = None) -> ImageDataset:
    """The dataset of ``cfg`` for ``split`` (default ``cfg.split``); see the module docstring."""
    split = cfg.split if split is None else split
    if cfg.kind == "auto" or (cfg.kind == "demo" and cfg.path):
        cfg = replace(cfg, kind=resolve_kind(cfg))
    path = split_path(cfg, split)
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
