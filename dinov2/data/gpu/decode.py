"""Decoding a dataset once into one ``uint8`` tensor, for the device pipeline (which keeps it in
device memory and indexes batches out of it)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

if TYPE_CHECKING:
    from dinov2.data.base import ImageDataset


def _square(image: Any, size: int) -> Any:
    """Shorter side to ``size`` (bicubic), then the central ``size × size`` square (PIL)."""
    w, h = image.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def decode_dataset(
    dataset: ImageDataset,
    indices: Sequence[int] | None = None,
    size: int | None = None,
    num_threads: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode ``dataset`` (or its ``indices``) once: ``(uint8 (N, H, W, 3), int64 labels (N,))`` on the CPU.

    Every image must have the same size unless ``size`` is given (then each is resized and centre-
    cropped to ``size × size``). Undecodable records are replaced as the dataset's ``get`` does."""
    indices = range(len(dataset)) if indices is None else indices

    def load(i: int) -> tuple[np.ndarray, int]:
        sample = dataset.get(int(i))
        image = sample.image if size is None else _square(sample.image, size)
        return np.asarray(image, dtype=np.uint8), sample.label

    with ThreadPoolExecutor(max_workers=num_threads) as pool:  # PIL releases the GIL while decoding
        decoded = list(pool.map(load, indices))
    if not decoded:
        raise ValueError(f"{getattr(dataset, 'source', 'dataset')} selects no images")
    shapes = {a.shape for a, _ in decoded}
    if len(shapes) > 1:
        listed = ", ".join(f"{s[1]}x{s[0]}" for s in sorted(shapes)[:3])
        raise ValueError(
            f"the device pipeline needs images of one size, found {len(shapes)} ({listed}, …); "
            "pass size= to resize them, or use data.pipeline=cpu"
        )
    images = torch.from_numpy(np.stack([a for a, _ in decoded]))
    labels = torch.tensor([label for _, label in decoded], dtype=torch.long)
    return images, labels
