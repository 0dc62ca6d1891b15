"""k-NN of a trained backbone at the end of training, on held-out images and labelled as what it is.

The queries (:func:`knn_sets`) are, in order of preference: ``eval.test_path`` (a second dataset of the
same kind), the dataset's ``eval.test_split`` when that reads other images than the training split (the
demo and blobs splits, ``{split}`` in the path, a folder's ``train/`` and ``val/`` sub-folders), or else a
fixed ``eval.holdout_fraction`` of the training images held out of the memory bank — seen in pretraining,
so printed as such (:mod:`dinov2.eval.holdout`). Unlabelled images give no k-NN: a reason instead.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from dinov2.config import Config
from dinov2.data import build_dataset
from dinov2.data.datasets import same_images
from dinov2.eval.features import eval_sizes, eval_transform, extract_features
from dinov2.eval.holdout import dataset_labels, holdout_note, holdout_sets
from dinov2.eval.knn import knn_classify

logger = logging.getLogger(__name__)


@dataclass
class KnnSets:
    train: Dataset | None
    test: Dataset | None
    description: str  # what the queries are, printed next to the score
    skip_reason: str | None = None  # set when there is nothing to score (train / test are None)


def knn_sets(cfg: Config) -> KnnSets:
    """The memory bank and the queries of the final k-NN of a run with ``cfg`` (module docstring)."""
    data = cfg.data.dataset
    train_set = build_dataset(data, split=data.split)
    if (dataset_labels(train_set) < 0).all():
        return KnnSets(None, None, "", f"the training images ({data.path or data.kind}) have no labels")
    if cfg.eval.test_path:
        test_set = build_dataset(dataclasses.replace(data, path=cfg.eval.test_path), split=cfg.eval.test_split)
        return KnnSets(train_set, test_set, f"eval.test_path={cfg.eval.test_path}")
    if not same_images(data, data.split, data, cfg.eval.test_split):
        description = f"the held-out split '{cfg.eval.test_split}'"
        return KnnSets(train_set, build_dataset(data, split=cfg.eval.test_split), description)
    bank, queries = holdout_sets(train_set, cfg.eval.holdout_fraction)
    note = holdout_note(cfg.eval.holdout_fraction, len(queries), seen_in_training=True)
    return KnnSets(bank, queries, note)


def knn_on_sets(backbone: nn.Module, sets: KnnSets, cfg: Config, device: torch.device) -> dict[int, float]:
    """Top-1 (%) per k of a weighted k-NN of ``backbone`` on ``sets``."""
    crops = cfg.data.crops
    resize, crop = eval_sizes(crops.global_crops_size, cfg.eval.resize, cfg.eval.crop)
    transform = eval_transform(resize=resize, crop=crop, mean=crops.mean, std=crops.std)
    amp = torch.bfloat16 if device.type == "cuda" else None
    kwargs = dict(
        transform=transform, batch_size=cfg.eval.batch_size, device=device, amp_dtype=amp, progress=cfg.train.progress
    )
    train_x, train_y = extract_features(backbone, sets.train, **kwargs)
    test_x, test_y = extract_features(backbone, sets.test, **kwargs)
    ks = [k for k in cfg.eval.knn_k if k <= len(sets.train)]
    return knn_classify(train_x, train_y, test_x, test_y, ks=ks, temperature=cfg.eval.knn_temperature)


def knn_of_backbone(backbone: nn.Module, cfg: Config, device: torch.device) -> dict[int, float]:
    """Top-1 (%) per k of the final k-NN (:func:`knn_sets`); ValueError when the images have no labels."""
    sets = knn_sets(cfg)
    if sets.skip_reason:
        raise ValueError(f"no k-NN: {sets.skip_reason}")
    return knn_on_sets(backbone, sets, cfg, device)
