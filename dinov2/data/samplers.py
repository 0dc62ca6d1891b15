"""A deterministic, infinite, rank-sharded stream of dataset indices whose position is resumable.

The *global stream* is the concatenation of epochs; epoch ``e`` is a permutation of
``range(dataset_size)`` drawn from a generator seeded by ``(seed, e)``. Global position ``p`` holds
``perm_e[p % N]`` with ``e = p // N``. Rank ``r`` of ``W`` reads positions ``start + r``,
``start + r + W``, ``start + r + 2W``… so the ranks together read the stream exactly once, and a
loader batch of ``B`` on every rank is one global batch of ``B * W`` consecutive positions.

With ``shuffle_window = w > 0`` and the dataset cut into consecutive groups (the samples of each tar
shard), an epoch's order is :func:`windowed_permutation` instead: the groups are shuffled, taken
``w`` at a time, and the samples of each window are shuffled among themselves. It is still a
permutation drawn from ``(seed, e)`` alone, so everything below holds unchanged; at any moment all
ranks read from the ``w`` shards of one window.

The only state is ``position`` (global samples consumed). The sampler cannot know what a training
loop consumed (DataLoader workers prefetch), so the loop reports it — :meth:`advance`, or a fresh
sampler with ``start = iteration * global_batch_size``. Because the position is global, a run can
resume at another world size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dinov2.data.seeding import STREAM_PERMUTATION, numpy_rng


def epoch_permutation(
    dataset_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_sizes: Sequence[int] | None = None,
    shuffle_window: int = 0,
) -> np.ndarray:
    """The order of epoch ``epoch``: a seeded permutation, or ``0..N-1`` without shuffling; with
    ``shuffle_window > 0``, the :func:`windowed_permutation` of the groups ``group_sizes``."""
    if shuffle and shuffle_window > 0:
        if group_sizes is None or sum(group_sizes) != dataset_size:
            raise ValueError("a shuffle window needs the dataset's group (shard) sizes, summing to its size")
        return windowed_permutation(group_sizes, shuffle_window, seed, epoch)
    dtype = np.int32 if dataset_size < 2**31 else np.int64
    order = np.arange(dataset_size, dtype=dtype)
    if shuffle:
        numpy_rng(seed, STREAM_PERMUTATION, epoch).shuffle(order)
    return order


def windowed_permutation(group_sizes: Sequence[int], window: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``0..sum(group_sizes)-1`` that keeps reads within ``window`` groups at a time.

    Group ``g`` holds the consecutive indices ``[start_g, start_g + size_g)``. The groups are put in a
    random order; each run of ``window`` groups in that order (the last one may be shorter) is a
    window, and the indices of a window are shuffled together. Drawn from ``(seed, epoch)`` alone.
    """
    if window < 1:
        raise ValueError(f"shuffle window must be >= 1 group, got {window}")
    sizes = np.asarray(group_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    dtype = np.int32 if starts[-1] < 2**31 else np.int64
    rng = numpy_rng(seed, STREAM_PERMUTATION, epoch)
    group_order = rng.permutation(len(sizes))
    windows = []
    for first in range(0, len(group_order), window):
        members = group_order[first : first + window]
        indices = np.concatenate([np.arange(starts[g], starts[g + 1], dtype=dtype) for g in members])
        rng.shuffle(indices)
        windows.append(indices)
    return np.concatenate(windows) if windows else np.empty(0, dtype=dtype)


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless indices (or ``(position, index)`` pairs) for rank ``rank`` of ``world_size``.

    With ``return_positions=True`` each item is ``(global position, dataset index)``, which lets
    the dataset wrapper seed the augmentations of a sample from its position in the stream.
    """

    def __init__(
        self,
        dataset_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
        return_positions: bool = False,
        group_sizes: Sequence[int] | None = None,
        shuffle_window: int = 0,
    ):
        if dataset_size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {dataset_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        if shuffle_window < 0:
            raise ValueError(f"shuffle window must be >= 0, got {shuffle_window}")
        if shuffle_window and (group_sizes is None or sum(group_sizes) != dataset_size):
            raise ValueError("a shuffle window needs a dataset made of shards (data.dataset.kind=shards)")
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.position = start
        self.return_positions = return_positions
        self.group_sizes = None if group_sizes is None else [int(g) for g in group_sizes]
        self.shuffle_window = shuffle_window

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        """The stream from the current ``position``; later changes to ``position`` do not affect it."""
        position = self.position + self.rank
        epoch, order = -1, None
        while True:
            if position // self.dataset_size != epoch:
                epoch = position // self.dataset_size
                order = epoch_permutation(
                    self.dataset_size, self.seed, epoch, self.shuffle, self.group_sizes, self.shuffle_window
                )
            index = int(order[position % self.dataset_size])
            yield (position, index) if self.return_positions else index
            position += self.world_size

    def advance(self, num_global_samples: int) -> None:
        """Record that the training loop consumed ``num_global_samples`` more (all ranks together)."""
        self.position += num_global_samples

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "position": self.position,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "shuffle": self.shuffle,
            "shuffle_window": self.shuffle_window,
        }

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue from a saved position; refuses a stream that was drawn differently."""
        for key in ("seed", "dataset_size", "shuffle", "shuffle_window"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has {getattr(self, key)}; "
                    "resuming would not continue the same sample stream"
                )
        self.position = int(state["position"])


class SamplerPositioned:
    """Mixin for a training loader whose stream is an :class:`InfiniteSampler` (both pipelines' loaders):
    its resumable position is the sampler's, saved and restored through it."""

    sampler: InfiniteSampler

    def state_dict(self) -> dict[str, int | bool]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue from a saved position on the next ``iter()``."""
        self.sampler.load_state_dict(state)
