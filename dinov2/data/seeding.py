"""Deterministic seeds derived from integers, and a scoped torch RNG.

Every random choice in the data pipeline (epoch permutations, augmentations, iBOT masks, the demo
images) is a pure function of the run seed and a position in the sample stream, so a resumed run
draws exactly what an uninterrupted run would have drawn, whatever the number of loader workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

# Distinct streams drawn from the same (seed, position) must not collide: each consumer adds its tag.
STREAM_PERMUTATION = 0
STREAM_AUGMENTATION = 1
STREAM_MASKS = 2
STREAM_DEMO = 3
STREAM_WORKER = 4


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (order matters)."""
    entropy = [int(k) for k in keys]
    if any(k < 0 for k in entropy):
        raise ValueError(f"seed keys must be non-negative, got {entropy}")
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def numpy_rng(*keys: int) -> np.random.Generator:
    """A numpy Generator seeded from ``keys`` (see :func:`derive_seed`)."""
    return np.random.default_rng(derive_seed(*keys))


@contextlib.contextmanager
def seeded_torch_rng(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded to ``seed``, restoring the caller's state afterwards.

    torchvision transforms draw from the global torch RNG; scoping it keeps their draws
    reproducible without disturbing the RNG the model (dropout, drop-path) uses in the same process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
