"""k-NN of a trained backbone on its dataset's held-out split, as printed at the end of training."""

from __future__ import annotations

import logging

import torch
from torch import nn

from dinov2.config import Config

logger = logging.getLogger(__name__)


def knn_of_backbone(backbone: nn.Module, cfg: Config, device: torch.device) -> dict[int, float]:
    """Top-1 (%) per k of a weighted k-NN: train split as the memory bank, ``eval.test_split`` as queries."""
    from dinov2.data import build_dataset
    from dinov2.eval.features import eval_transform, extract_features
    from dinov2.eval.knn import knn_classify

    train_set = build_dataset(cfg.data.dataset, split=cfg.data.dataset.split)
    test_set = build_dataset(cfg.data.dataset, split=cfg.eval.test_split)
    transform = eval_transform(
        resize=cfg.data.crops.global_crops_size, crop=None, mean=cfg.data.crops.mean, std=cfg.data.crops.std
    )
    amp = torch.bfloat16 if device.type == "cuda" else None
    kwargs = dict(transform=transform, batch_size=256, device=device, amp_dtype=amp, progress=cfg.train.progress)
    train_x, train_y = extract_features(backbone, train_set, **kwargs)
    test_x, test_y = extract_features(backbone, test_set, **kwargs)
    ks = [k for k in cfg.eval.knn_k if k <= len(train_set)]
    return knn_classify(train_x, train_y, test_x, test_y, ks=ks, temperature=cfg.eval.knn_temperature)
