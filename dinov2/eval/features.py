"""Frozen-backbone features for evaluation: the eval transform and batched feature extraction.

:func:`extract_features` runs a backbone over a labelled dataset (items ``(PIL image, label)``) and
returns one float32 row per image: the final-norm CLS token, optionally concatenated with the mean of
the patch tokens (the linear-probe input of DINOv2), L2-normalized by default (the k-NN input).

Under ``torch.distributed`` each rank processes the strided shard ``rank, rank + world, ...`` of the
dataset (the last shards are padded with repeats of the first image so that every rank runs the same
number of batches) and, with ``gather=True``, the shards are all-gathered back into dataset order, so
every rank returns exactly what a single process would. ``gather=False`` returns the rank's own
shard only (a sharded train set for distributed k-NN).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dinov2.device import autocast
from dinov2.distributed.comm import rank_and_world
from dinov2.eval.gather import all_gather_stacked

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(
    resize: int | None = None,
    crop: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Any], Tensor]:
    """PIL image → normalized float ``(3, H, W)`` tensor (torchvision.transforms.v2).

    ``resize`` scales the shorter side (bicubic, antialiased), ``crop`` takes a centre square; leave
    both ``None`` for small images (e.g. 32 px CIFAR) that the backbone takes as they are. The
    classic ImageNet protocol is ``resize=256, crop=224``.
    """
    from torchvision.transforms import v2  # lazy: torchvision adds ~3 s to importing this module

    steps: list[Any] = [v2.ToImage()]
    if resize is not None:
        steps.append(v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True))
    if crop is not None:
        steps.append(v2.CenterCrop(crop))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)


def eval_sizes(
    global_crops_size: int, resize: int | None = None, crop: int | None = None
) -> tuple[int | None, int | None]:
    """``(resize, crop)`` of a checkpoint's evaluation transform (``eval.resize`` / ``eval.crop``).

    ``None`` picks the default: a centre crop of the training's global crop size, after resizing the
    shorter side by the reference's 256 / 224 ratio (224 → 256, 32 → 37); ``0`` turns the step off. With
    both steps on, images of any size and aspect ratio come out the same size and batch together.
    """
    crop = global_crops_size if crop is None else crop
    if resize is None:
        resize = round((crop or global_crops_size) * 256 / 224)
    return (resize or None), (crop or None)


class _TransformedSubset(Dataset):
    """``(transform(image), label)`` for the dataset items at ``indices``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable[[Any], Tensor]):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.dataset[self.indices[i]]
        return self.transform(image), int(label)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s strided share of ``range(n)``, padded with index 0 to ``ceil(n / world)``."""
    per_rank = -(-n // world)
    own = list(range(rank, n, world))
    return own + [0] * (per_rank - len(own))


def unshard(stacked: Tensor, n: int) -> Tensor:
    """Inverse of :func:`shard_indices`: ``(world, per_rank, ...)`` → the first ``n`` rows in order."""
    world, per_rank = stacked.shape[:2]
    return stacked.transpose(0, 1).reshape(world * per_rank, *stacked.shape[2:])[:n]


def backbone_features(out: dict[str, Tensor], patch_mean: bool = False) -> Tensor:
    """The evaluation feature of a backbone output dict: CLS, or [CLS, mean of patch tokens]."""
    if not patch_mean:
        return out["cls"]
    return torch.cat([out["cls"], out["patch"].mean(dim=1)], dim=-1)


def _features(backbone: nn.Module, images: Tensor, patch_mean: bool, normalize: bool) -> Tensor:
    """One batch's evaluation features (float32), L2-normalized when ``normalize``."""
    f = backbone_features(backbone(images), patch_mean).float()
    return F.normalize(f, dim=-1) if normalize else f


def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    transform: Callable[[Any], Tensor] | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    *,
    patch_mean: bool = False,
    normalize: bool = True,
    flip_average: bool = False,
    gather: bool = True,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(features float32 (N, D), labels int64 (N,))`` on the CPU, in dataset order.

    ``transform`` defaults to :func:`eval_transform` with ImageNet statistics; ``device`` to the
    backbone's; ``amp_dtype`` (e.g. ``torch.bfloat16``) enables autocast. ``patch_mean`` appends the
    mean patch token (``D`` doubles); ``normalize`` L2-normalizes each row. ``flip_average`` also runs
    the horizontally mirrored image and returns the mean of the two features (each L2-normalized first
    when ``normalize``), so an image and its mirror get the same row. The backbone runs in eval
    mode under ``torch.inference_mode`` and gets its training mode back afterwards. See the module
    docstring for the distributed behaviour and ``gather``.
    """
    transform = transform if transform is not None else eval_transform()
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    rank, world = rank_and_world()
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot extract features from an empty dataset")
    indices = shard_indices(n, rank, world) if world > 1 else list(range(n))
    loader = DataLoader(
        _TransformedSubset(dataset, indices, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    mixed_precision = autocast(device, amp_dtype)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        with torch.inference_mode(), mixed_precision:
            for images, targets in tqdm(loader, desc="features", disable=not progress or rank != 0, leave=False):
                images = images.to(device, non_blocking=True)
                f = _features(backbone, images, patch_mean, normalize)
                if flip_average:
                    f = (f + _features(backbone, images.flip(-1), patch_mean, normalize)) / 2
                    f = F.normalize(f, dim=-1) if normalize else f
                feats.append(f)
                labels.append(targets.to(torch.int64))
    finally:
        backbone.train(was_training)
    features = torch.cat(feats).cpu()
    targets = torch.cat(labels)
    if world == 1:
        return features, targets
    own = len(range(rank, n, world))
    if not gather:
        return features[:own], targets[:own]
    return unshard(all_gather_stacked(features), n), unshard(all_gather_stacked(targets), n)
