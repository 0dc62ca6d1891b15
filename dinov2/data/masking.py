"""iBOT block masks: random rectangles of patches, and their per-batch sampling.

A mask covers a target number of patches with rectangles of at least ``min_num_patches`` patches
and a log-uniform aspect ratio; it never covers more than the target and usually reaches it
exactly. Per batch, a fraction of the global crops is masked, with target ratios stratified over
``[ratio_min, ratio_max]`` so that each batch sees the whole range of masking strengths.
All randomness comes from an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import math

import numpy as np


class MaskingGenerator:
    """Draws boolean masks of shape ``grid`` (patch rows, patch columns) made of random blocks."""

    def __init__(
        self,
        grid: tuple[int, int] | int,
        min_num_patches: int = 4,
        aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
        max_num_patches: int | None = None,
        attempts_per_block: int = 10,
        max_failed_blocks: int = 20,
    ):
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.num_patches = self.height * self.width
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        low, high = sorted(aspect_ratio)
        self.log_aspect = (math.log(low), math.log(high))
        self.attempts_per_block = attempts_per_block
        self.max_failed_blocks = max_failed_blocks

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator(grid=({self.height}, {self.width}), min_num_patches={self.min_num_patches}, "
            f"aspect_ratio=({math.exp(self.log_aspect[0]):.3f}, {math.exp(self.log_aspect[1]):.3f}), "
            f"max_num_patches={self.max_num_patches})"
        )

    def __call__(self, num_masking_patches: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """A ``(h, w)`` bool mask with at most ``num_masking_patches`` patches set."""
        rng = np.random.default_rng() if rng is None else rng
        mask = np.zeros((self.height, self.width), dtype=bool)
        target = min(num_masking_patches, self.num_patches)
        if target < self.min_num_patches:  # no block fits the budget
            return mask
        count, failures = 0, 0
        while count < target and failures < self.max_failed_blocks:
            added = self._add_block(mask, target - count, rng)
            count += added
            failures = 0 if added else failures + 1
        return mask

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Mask one random rectangle adding 1..``budget`` new patches; the number added (0: none fit)."""
        max_area = min(self.max_num_patches, max(budget, self.min_num_patches))
        for _ in range(self.attempts_per_block):
            area = rng.uniform(self.min_num_patches, max_area)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h * w < self.min_num_patches or h > self.height or w > self.width:
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block[...] = True
                return new
        return 0


def sample_masks(
    n_crops: int,
    grid: tuple[int, int] | int,
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    generator: np.random.Generator | None = None,
    *,
    min_num_patches: int = 4,
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
    max_num_patches: int | None = None,
) -> np.ndarray:
    """Masks ``(n_crops, h, w)`` for a batch of global crops.

    ``round(n_crops * mask_probability)`` crops are masked; masked crop ``i`` targets a ratio drawn
    uniformly in ``[lin[i], lin[i + 1]]`` with ``lin = linspace(min, max, n_masked + 1)``; the others
    are empty. Which crops are masked is then shuffled.
    """
    rng = np.random.default_rng() if generator is None else generator
    masker = MaskingGenerator(grid, min_num_patches, aspect_ratio, max_num_patches)
    n_masked = int(math.floor(n_crops * mask_probability + 0.5))
    bounds = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    masks = np.zeros((n_crops, masker.height, masker.width), dtype=bool)
    for i in range(n_masked):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks[i] = masker(int(ratio * masker.num_patches), rng)
    return masks[rng.permutation(n_crops)]
