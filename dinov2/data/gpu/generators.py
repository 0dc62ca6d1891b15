"""The random numbers of the device pipeline: one ``torch.Generator`` per batch, on the batch's device.

Every draw of a batch's augmentation comes from the generator of :func:`batch_generator`, seeded from
``(seed, position of the batch's first sample)``, so a batch is a function of its place in the stream
(on a given device type: CPU and CUDA generators draw different numbers from the same seed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dinov2.data.seeding import derive_seed

STREAM_GPU_AUGMENTATION = 5  # seed stream of the per-batch device generator (next to dinov2.data.seeding's)


def device_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def batch_generator(device: torch.device | str, seed: int, first_position: int) -> torch.Generator:
    """The augmentation generator of the batch whose first sample sits at ``first_position``."""
    return device_generator(device, derive_seed(seed, STREAM_GPU_AUGMENTATION, first_position))


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``U[0, 1)`` draws of ``shape`` on ``device`` from ``generator``."""
    return torch.rand(shape, generator=generator, device=device)
