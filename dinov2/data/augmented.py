"""Training samples: a decoded image, augmented with randomness seeded by its stream position.

The sampler hands over ``(position, index)``; the augmentation of that sample runs with torch's RNG
seeded from ``(seed, position)``. A sample therefore does not depend on which worker process made
it or on what that process did before, which is what makes a resumed run bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dinov2.data.base import ImageDataset
from dinov2.data.seeding import STREAM_AUGMENTATION, derive_seed, seeded_torch_rng


class AugmentedDataset(torch.utils.data.Dataset):
    """``item -> {**transform(image), "label", "position", "skipped"}`` for ``item = (position, index)``.

    A bare integer ``item`` is both position and index. ``skipped`` lists the records that failed
    to decode and were replaced (so the count reaches the main process through the batch).
    """

    def __init__(self, dataset: ImageDataset, transform: Callable[[Any], dict[str, Any]], seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        position, index = item if isinstance(item, tuple) else (item, item)
        sample = self.dataset.get(index)
        with seeded_torch_rng(derive_seed(self.seed, STREAM_AUGMENTATION, position)):
            out = dict(self.transform(sample.image))
        out.update(label=sample.label, position=position, skipped=sample.skipped)
        return out
