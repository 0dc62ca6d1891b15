"""The device training stream (``data.pipeline=gpu``): the dataset decoded once into device memory,
batches drawn by the CPU pipeline's :class:`~dinov2.data.samplers.InfiniteSampler`, augmented there by
:class:`~dinov2.data.gpu.multicrop.GPUMultiCrop`, with the CPU pipeline's iBOT masks.

:class:`GPUTrainLoader` (built by :func:`build_gpu_train_loader`) is the device counterpart of
:class:`~dinov2.data.loader.TrainLoader` — both are :class:`~dinov2.data.batches.TrainBatches`: the
same sample stream and the same iBOT masks (same generator seeds, computed on the CPU — optionally in
worker processes — and copied over), batches with the keys of
:func:`~dinov2.data.collate.collate_multicrop`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dinov2.data.collate import batch_masks
from dinov2.data.datasets import build_dataset
from dinov2.data.gpu.decode import decode_dataset
from dinov2.data.gpu.generators import batch_generator
from dinov2.data.gpu.multicrop import GPUMultiCrop, as_nchw
from dinov2.data.loader import train_sampler
from dinov2.data.samplers import InfiniteSampler, SamplerPositioned
from dinov2.data.seeding import STREAM_MASKS, numpy_rng

if TYPE_CHECKING:
    from dinov2.config import CropsConfig, DataConfig, MaskConfig
    from dinov2.data.base import ImageDataset


def collate_gpu(
    images: Tensor,
    positions: Tensor,
    labels: Tensor | None,
    augment: GPUMultiCrop,
    mask_cfg: MaskConfig,
    patch_size: int,
    seed: int = 0,
    masks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A training batch from a ``uint8`` image batch on the device, with the keys of
    :func:`~dinov2.data.collate.collate_multicrop` (``global_crops``, ``local_crops``, ``masks``,
    ``mask_indices``, ``n_masked_patches``, ``mask_weights``, ``labels``, ``positions``,
    ``num_skipped = 0``, ``skipped_paths = []``), every tensor on the images' device.

    ``positions`` (a CPU tensor or sequence) are the samples' stream positions: the first one seeds
    the augmentation generator and, unless ``masks`` (from :func:`~dinov2.data.collate.batch_masks`)
    are given, the masks — with the CPU path's seed, so both pipelines mask a batch identically.
    """
    device = images.device
    positions = torch.as_tensor(positions, dtype=torch.long)
    first = int(positions[0])
    crops = augment(images, batch_generator(device, seed, first))
    if masks is None:
        size = augment.cfg.global_crops_size
        grid = (size // patch_size, size // patch_size)
        masks = batch_masks(crops["global_crops"].shape[0], grid, mask_cfg, numpy_rng(seed, STREAM_MASKS, first))
    if labels is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.long)
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in masks.items()}
    return {
        "global_crops": crops["global_crops"],
        "local_crops": crops["local_crops"],
        **moved,
        "labels": labels.to(device, torch.long, non_blocking=True),
        "positions": positions.to(device, non_blocking=True),
        "num_skipped": 0,
        "skipped_paths": [],
    }


class _BatchMasks(torch.utils.data.Dataset):
    """Item ``p``: the masks of the batch whose first sample is at stream position ``p``."""

    def __init__(self, num_global_crops: int, grid: tuple[int, int], mask_cfg: MaskConfig, seed: int) -> None:
        self.num_global_crops, self.grid, self.mask_cfg, self.seed = num_global_crops, grid, mask_cfg, seed

    def __getitem__(self, first_position: int) -> dict[str, Any]:
        rng = numpy_rng(self.seed, STREAM_MASKS, first_position)
        return batch_masks(self.num_global_crops, self.grid, self.mask_cfg, rng)


class _Arithmetic(torch.utils.data.Sampler):
    """``start, start + step, …`` forever."""

    def __init__(self, start: int, step: int) -> None:
        self.start, self.step = start, step

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start, self.step)


class GPUTrainLoader(SamplerPositioned):
    """Endless, resumable training batches from images held in device memory, augmented there.

    The counterpart of :class:`~dinov2.data.loader.TrainLoader` (same ``num_skipped``,
    ``state_dict``/``load_state_dict``): an :class:`InfiniteSampler` stream (so a
    batch holds the same images as the CPU pipeline's batch at that iteration), iBOT masks drawn on
    the CPU with the CPU path's seeds (in ``mask_workers`` processes when > 0, prefetched), and
    :class:`GPUMultiCrop` on the device. ``images``: ``uint8 (N, H, W, 3)`` or ``(N, 3, H, W)``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None,
        crops: CropsConfig,
        masks: MaskConfig,
        patch_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_iteration: int = 0,
        mask_workers: int = 0,
        interpolation: str = "bicubic",
        sampler: InfiniteSampler | None = None,
    ) -> None:
        self.images = as_nchw(images)
        self.device = self.images.device
        n = self.images.shape[0]
        self.labels = (
            torch.full((n,), -1, dtype=torch.long, device=self.device)
            if labels is None
            else labels.to(self.device, torch.long)
        )
        self.augment = GPUMultiCrop(crops, interpolation=interpolation)
        self.mask_cfg = masks
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.global_batch_size = batch_size * world_size
        self.mask_workers = mask_workers
        # the stream's seed, rank and world size live in the sampler (the training one: ``train_sampler``)
        self.sampler = sampler or InfiniteSampler(
            n, seed=seed, rank=rank, world_size=world_size, start=start_iteration * self.global_batch_size,
            return_positions=True,
        )  # fmt: skip
        self.num_skipped = 0

    def _masks(self, start_position: int) -> Iterator[dict[str, Any]]:
        size = self.augment.cfg.global_crops_size
        dataset = _BatchMasks(2 * self.batch_size, (size // self.patch_size,) * 2, self.mask_cfg, self.sampler.seed)
        firsts = _Arithmetic(start_position + self.sampler.rank, self.global_batch_size)
        if self.mask_workers <= 0:
            return (dataset[p] for p in firsts)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=firsts,
            num_workers=self.mask_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = iter(self.sampler)
        masks = self._masks(self.sampler.position)
        while True:
            items = list(itertools.islice(stream, self.batch_size))
            positions = torch.tensor([p for p, _ in items], dtype=torch.long)
            index = torch.tensor([i for _, i in items], dtype=torch.long).to(self.device, non_blocking=True)
            batch = collate_gpu(
                self.images.index_select(0, index), positions, self.labels.index_select(0, index),
                self.augment, self.mask_cfg, self.patch_size, self.sampler.seed, masks=next(masks),
            )  # fmt: skip
            self.sampler.advance(self.global_batch_size)
            yield batch


def build_gpu_train_loader(
    cfg: DataConfig,
    patch_size: int,
    device: torch.device | str,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_iteration: int = 0,
    dataset: ImageDataset | None = None,
) -> GPUTrainLoader:
    """``data.pipeline=gpu``: the dataset decoded once into ``device`` memory and augmented there.

    Same arguments as :func:`~dinov2.data.loader.build_train_loader` plus ``device``; the masks are
    drawn in ``cfg.num_workers`` worker processes."""
    dataset = build_dataset(cfg.dataset) if dataset is None else dataset
    sampler = train_sampler(cfg, dataset, seed, rank, world_size, start_iteration)  # checked before decoding
    images, labels = decode_dataset(dataset, num_threads=max(1, cfg.num_workers))
    return GPUTrainLoader(
        images.to(device),
        labels,
        cfg.crops,
        cfg.masks,
        patch_size,
        cfg.batch_size_per_gpu,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_iteration=start_iteration,
        mask_workers=cfg.num_workers,
        sampler=sampler,
    )
