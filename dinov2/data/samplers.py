"""A deterministic, infinite, rank-sharded stream of dataset indices whose position is resumable.

The *global stream* is the concatenation of epochs; epoch ``e`` is a permutation of
``range(dataset_size)`` drawn from a generator seeded by ``(seed, e)``. Global position ``p`` holds
``perm_e[p % N]`` with ``e = p // N``. Rank ``r`` of ``W`` reads positions ``start + r``,
``start + r + W``, ``start + r + 2W``… so the ranks together read the stream exactly once, and a
loader batch of ``B`` on every rank is one global batch of ``B * W`` consecutive positions.

The only state is ``position`` (global samples consumed). The sampler cannot know what a training
loop consumed (DataLoader workers prefetch), so the loop reports it — :meth:`advance`, or a fresh
sampler with ``start = iteration * global_batch_size``. Because the position is global, a run can
resume at another world size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dinov2.data.seeding import STREAM_PERMUTATION, numpy_rng


def epoch_permutation(dataset_size: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of epoch ``epoch``: a seeded permutation, or ``0..N-1`` without shuffling."""
    dtype = np.int32 if dataset_size < 2**31 else np.int64
    order = np.arange(dataset_size, dtype=dtype)
    if shuffle:
        numpy_rng(seed, STREAM_PERMUTATION, epoch).shuffle(order)
    return order


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
    ):
        if dataset_size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {dataset_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.position = start
        self.return_positions = return_positions

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        """The stream from the current ``position``; later changes to ``position`` do not affect it."""
        position = self.position + self.rank
        epoch, order = -1, None
        while True:
            if position // self.dataset_size != epoch:
                epoch = position // self.dataset_size
                order = epoch_permutation(self.dataset_size, self.seed, epoch, self.shuffle)
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
        }

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue from a saved position; refuses a stream that was drawn differently."""
        for key in ("seed", "dataset_size", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has {getattr(self, key)}; "
                    "resuming would not continue the same sample stream"
                )
        self.position = int(state["position"])
