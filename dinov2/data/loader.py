"""``build_train_loader``: the endless, resumable stream of multi-crop training batches of one rank.

Dataset → :class:`AugmentedDataset` (crops seeded by stream position) → DataLoader driven by an
:class:`InfiniteSampler` that starts at ``start_iteration * batch_size_per_gpu * world_size`` →
:class:`MultiCropCollate` (masks seeded by stream position). Nothing depends on worker RNG state,
so a loader started at iteration ``k`` yields exactly the batches an uninterrupted one yields from
its ``k``-th on, with any ``num_workers``.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dinov2.config import ConfigError
from dinov2.data.augmentations import MultiCropAugmentation
from dinov2.data.augmented import AugmentedDataset
from dinov2.data.base import ImageDataset
from dinov2.data.collate import MultiCropCollate
from dinov2.data.datasets import build_dataset
from dinov2.data.samplers import InfiniteSampler, SamplerPositioned
from dinov2.data.seeding import STREAM_WORKER, derive_seed

if TYPE_CHECKING:
    from dinov2.config import DataConfig


def seed_worker(worker_id: int, base_seed: int) -> None:
    """DataLoader ``worker_init_fn``: seed torch, numpy and random from ``(base_seed, worker_id)``.

    The pipeline does not draw from these global generators, but a user transform might; this
    keeps it reproducible too.
    """
    seed = derive_seed(base_seed, worker_id)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class TrainLoader(SamplerPositioned):
    """Iterable over batches (dicts, see ``collate_multicrop``); tracks what the caller consumed.

    Each batch handed out advances the sampler by one global batch, so :meth:`state_dict` is the
    consumed position however far the workers prefetched, and iterating again continues from it.
    ``skipped_paths`` are the undecodable records seen in this rank's batches and ``num_skipped`` their
    number: files, not skip events (a bad file drawn again and again counts once).
    """

    def __init__(self, dataloader: torch.utils.data.DataLoader, sampler: InfiniteSampler, global_batch_size: int):
        self.dataloader = dataloader
        self.sampler = sampler
        self.global_batch_size = global_batch_size
        self.num_skipped = 0
        self.skipped_paths: set[str] = set()

    @property
    def dataset(self) -> ImageDataset:
        return self.dataloader.dataset.dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.dataloader:
            self.sampler.advance(self.global_batch_size)
            self.skipped_paths.update(batch["skipped_paths"])
            self.num_skipped = len(self.skipped_paths)
            yield batch


def train_sampler(
    cfg: DataConfig, dataset: ImageDataset, seed: int, rank: int, world_size: int, start_iteration: int
) -> InfiniteSampler:
    """The sample stream of ``rank`` from iteration ``start_iteration`` — the same for both pipelines: a seeded
    permutation per epoch, shard-window shuffled (``data.shuffle_window``) over a shards dataset."""
    if cfg.shuffle_window < 0 or (cfg.shuffle_window and not hasattr(dataset, "shard_sizes")):
        raise ConfigError(
            f"data.shuffle_window={cfg.shuffle_window}: needs a value >= 0, and data.dataset.kind=shards when > 0"
        )
    return InfiniteSampler(
        len(dataset),
        seed=seed,
        rank=rank,
        world_size=world_size,
        start=start_iteration * cfg.batch_size_per_gpu * world_size,
        return_positions=True,
        group_sizes=getattr(dataset, "shard_sizes", None) if cfg.shuffle_window else None,
        shuffle_window=cfg.shuffle_window,
    )


def build_train_loader(
    cfg: DataConfig,
    patch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_iteration: int = 0,
    dataset: ImageDataset | None = None,
    transform: Callable[[Any], dict[str, Any]] | None = None,
) -> TrainLoader:
    """The training batches of ``rank``, starting at iteration ``start_iteration``.

    ``dataset`` overrides ``cfg.dataset`` (for callers that already hold one); ``transform`` replaces
    the multi-crop augmentation (it must return the same ``global_crops`` / ``local_crops`` layout).
    """
    dataset = build_dataset(cfg.dataset) if dataset is None else dataset
    sampler = train_sampler(cfg, dataset, seed, rank, world_size, start_iteration)
    workers = cfg.num_workers
    dataloader = torch.utils.data.DataLoader(
        AugmentedDataset(dataset, transform or MultiCropAugmentation(cfg.crops), seed=seed),
        batch_size=cfg.batch_size_per_gpu,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        collate_fn=MultiCropCollate(cfg.masks, patch_size, seed=seed),
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=functools.partial(seed_worker, base_seed=derive_seed(seed, STREAM_WORKER, rank)),
        # A private generator: creating the loader must not consume the caller's global torch RNG.
        generator=torch.Generator().manual_seed(derive_seed(seed, STREAM_WORKER, rank)),
    )
    return TrainLoader(dataloader, sampler, cfg.batch_size_per_gpu * world_size)
