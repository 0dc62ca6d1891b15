"""What the training loop consumes from a training loader, whichever pipeline made it.

Both :class:`~dinov2.data.loader.TrainLoader` (``data.pipeline=cpu``) and
:class:`~dinov2.data.gpu.loader.GPUTrainLoader` (``data.pipeline=gpu``) are :class:`TrainBatches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

TRAIN_BATCH_KEYS = frozenset(
    {
        "global_crops",  # (2B, 3, G, G), view-major
        "local_crops",  # (N·B, 3, L, L), view-major; (0,) when N = 0
        "masks",  # (2B, patches) bool, one row per global crop
        "mask_indices",  # positions of the masked patches in masks.flatten()
        "n_masked_patches",  # int
        "mask_weights",  # 1 / masked patches of the crop, one per masked patch
        "labels",  # (B,) int64, -1 when unlabelled
        "positions",  # (B,) stream positions of the samples
        "num_skipped",  # int: records of this batch replaced because they failed to decode
        "skipped_paths",  # their paths
    }
)  # the keys of every batch (see dinov2.data.collate.collate_multicrop)


@runtime_checkable
class TrainBatches(Protocol):
    """An endless, resumable stream of training batches of one rank.

    ``iter()`` yields dicts with the :data:`TRAIN_BATCH_KEYS` and continues from the consumed position;
    ``state_dict()["position"]`` is the global sample position consumed so far, and
    ``load_state_dict({"position": p})`` makes the next ``iter()`` continue from ``p`` (at any world
    size); ``num_skipped`` totals the undecodable records seen in this rank's batches.
    """

    num_skipped: int

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
