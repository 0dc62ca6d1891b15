"""Stochastic depth for residual branches over packed crop groups.

``efficient`` (the DINOv2 trick): per crop group of B samples, the branch is computed only for a
random subset of ``max(1, floor(B * (1 - p)))`` samples and its output is added back to those samples
scaled by ``B / subset``, so the expected update equals the undropped one and the branch's FLOPs fall
by about ``p``. ``classic``: the branch runs on every sample and each sample's output is kept with
probability ``1 - p`` and scaled by ``1 / (1 - p)`` (DropPath). Samples never mix inside a branch
(attention is per sample, norms and FFNs per token), which is what makes the subset trick exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Seqs = Sequence[tuple[int, int]]
Branch = Callable[[Tensor, Seqs], Tensor]  # packed (T, D) tokens -> packed (T, D) update

MODES = ("efficient", "classic")


def _group_offsets(seqs: Seqs) -> list[int]:
    offsets, start = [], 0
    for b, n in seqs:
        offsets.append(start)
        start += b * n
    return offsets


def residual_with_subset(x: Tensor, seqs: Seqs, branch: Branch, p: float) -> Tensor:
    """x + branch(x) where the branch sees a random subset of each group's samples (efficient mode)."""
    rows, scales, sub_seqs = [], [], []
    for offset, (b, n) in zip(_group_offsets(seqs), seqs, strict=True):
        keep = max(1, int(b * (1.0 - p)))
        chosen = torch.randperm(b, device=x.device)[:keep]
        token = torch.arange(n, device=x.device)
        rows.append((offset + chosen[:, None] * n + token).reshape(-1))
        scales.append(torch.full((keep * n,), b / keep, device=x.device, dtype=x.dtype))
        sub_seqs.append((keep, n))
    index = torch.cat(rows)
    update = branch(x[index], sub_seqs) * torch.cat(scales)[:, None]
    return x.index_add(0, index, update.to(x.dtype))


def residual_with_drop_path(x: Tensor, seqs: Seqs, branch: Branch, p: float) -> Tensor:
    """x + branch(x) * per-sample Bernoulli(1 - p) / (1 - p) (classic DropPath)."""
    keep = [torch.bernoulli(torch.full((b,), 1.0 - p, device=x.device)) / (1.0 - p) for b, _ in seqs]
    per_row = torch.cat([k.repeat_interleave(n) for k, (_, n) in zip(keep, seqs, strict=True)])
    return x + branch(x, seqs) * per_row[:, None].to(x.dtype)


def residual(x: Tensor, seqs: Seqs, branch: Branch, p: float, mode: str, training: bool) -> Tensor:
    """Apply one residual branch with stochastic depth rate ``p`` when training."""
    if not training or p <= 0.0:
        return x + branch(x, seqs)
    if mode == "efficient":
        return residual_with_subset(x, seqs, branch, p)
    if mode == "classic":
        return residual_with_drop_path(x, seqs, branch, p)
    raise ValueError(f"unknown drop_path_mode '{mode}' (expected one of {MODES})")
