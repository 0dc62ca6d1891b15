"""Collate multi-crop samples into crop groups, with iBOT masks for the global crops.

Crops are stacked *view-major*: ``global_crops[v * B + b]`` is view ``v`` of image ``b``, so the
first ``B`` rows are every image's first global crop. ``masks[i]`` belongs to ``global_crops[i]``.
The masks are drawn from a generator seeded by ``(seed, position of the batch's first sample)``, so
like the crops they are a function of the place of the batch in the sample stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dinov2.data.masking import sample_masks
from dinov2.data.seeding import STREAM_MASKS, numpy_rng

if TYPE_CHECKING:
    from dinov2.config import MaskConfig


def stack_view_major(views_per_sample: list[list[torch.Tensor]]) -> torch.Tensor:
    """``[[v0, v1, …] per sample] -> (V * B, …)`` with all samples' view 0 first."""
    num_views = len(views_per_sample[0])
    if num_views == 0:
        return torch.empty(0)
    return torch.stack([views[v] for v in range(num_views) for views in views_per_sample])


def mask_tensors(masks: torch.Tensor) -> dict[str, Any]:
    """Flattened masks ``(n, P)`` plus the index and weight forms the iBOT loss uses."""
    mask_indices = masks.flatten().nonzero().flatten()
    per_crop = masks.sum(dim=-1, dtype=torch.float32).clamp(min=1.0)
    mask_weights = (1.0 / per_crop).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "masks": masks,
        "mask_indices": mask_indices,
        "n_masked_patches": int(mask_indices.numel()),
        "mask_weights": mask_weights,
    }


def batch_masks(
    num_global_crops: int, grid: tuple[int, int], mask_cfg: MaskConfig, rng: np.random.Generator | None
) -> dict[str, Any]:
    """iBOT masks of ``num_global_crops`` crops of ``grid`` patches, drawn from ``rng`` (the same
    generator gives the same masks on either pipeline), in :func:`mask_tensors` form."""
    masks = sample_masks(
        num_global_crops,
        grid,
        mask_probability=mask_cfg.mask_probability,
        ratio_min_max=tuple(mask_cfg.mask_ratio_min_max),
        generator=rng,
        min_num_patches=mask_cfg.min_num_patches,
        aspect_ratio=tuple(mask_cfg.aspect_ratio_min_max),
    )
    return mask_tensors(torch.from_numpy(masks).flatten(1))


def collate_multicrop(
    samples: list[dict[str, Any]],
    mask_cfg: MaskConfig,
    patch_size: int,
    generator: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Batch samples of :class:`~dinov2.data.augmented.AugmentedDataset` (see the module docstring).

    Keys: ``global_crops (2B, 3, G, G)``, ``local_crops (N*B, 3, L, L)`` (``(0,)`` when N = 0),
    ``masks (2B, (G/p)^2)`` bool, ``mask_indices`` (positions of the masked patches in
    ``masks.flatten()``), ``n_masked_patches`` (int), ``mask_weights`` (1 / masked patches of the
    crop, one per masked patch), ``labels (B,)``, ``positions (B,)`` (stream positions),
    ``num_skipped`` (int) and ``skipped_paths`` (records replaced because they failed to decode).
    """
    global_crops = stack_view_major([s["global_crops"] for s in samples])
    height, width = global_crops.shape[-2:]
    masks = batch_masks(len(global_crops), (height // patch_size, width // patch_size), mask_cfg, generator)
    skipped_paths = [path for s in samples for path in s.get("skipped", ())]
    return {
        "global_crops": global_crops,
        "local_crops": stack_view_major([s["local_crops"] for s in samples]),
        **masks,
        "labels": torch.tensor([s.get("label", -1) for s in samples], dtype=torch.long),
        "positions": torch.tensor([s.get("position", -1) for s in samples], dtype=torch.long),
        "num_skipped": len(skipped_paths),
        "skipped_paths": skipped_paths,
    }


class MultiCropCollate:
    """Picklable collate function for DataLoader workers; masks seeded by the batch's position."""

    def __init__(self, mask_cfg: MaskConfig, patch_size: int, seed: int = 0):
        self.mask_cfg = mask_cfg
        self.patch_size = patch_size
        self.seed = seed

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        position = samples[0].get("position")
        rng = None if position is None else numpy_rng(self.seed, STREAM_MASKS, position)
        return collate_multicrop(samples, self.mask_cfg, self.patch_size, rng)
