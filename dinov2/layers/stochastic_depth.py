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


def kept_samples(batch: int, p: float) -> int:
    """Samples of a group of ``batch`` that a branch computes on under efficient stochastic depth."""
    return max(1, int(batch * (1.0 - p)))


def subset_seqs(seqs: Seqs, p: float) -> list[tuple[int, int]]:
    """The packed layout a branch sees under efficient stochastic depth at rate ``p`` (deterministic:
    only *which* samples are kept is random), so per-layout attention metadata can be built ahead."""
    return [(kept_samples(b, p), n) for b, n in seqs]


def residual_with_subset(x: Tensor, seqs: Seqs, branch: Branch, p: float) -> Tensor:
    """x + branch(x) where the branch sees a random subset of each group's samples (efficient mode).

    The result has the dtype ``x + branch(x)`` has (as in evaluation, where every sample is updated), and
    each group's ``b / keep`` rescaling is exact: fused into the scatter-add for an fp32 stream, applied
    in fp32 before rounding for a bf16 one (a bf16 factor is off by up to 0.4 %)."""
    rows, sub_seqs = [], subset_seqs(seqs, p)
    for offset, (b, n), (keep, _) in zip(_group_offsets(seqs), seqs, sub_seqs, strict=True):
        chosen = torch.randperm(b, device=x.device)[:keep]
        token = torch.arange(n, device=x.device)
        rows.append((offset + chosen[:, None] * n + token).reshape(-1))
    index = rows[0] if len(rows) == 1 else torch.cat(rows)
    update = branch(x.index_select(0, index), sub_seqs)  # (backward: a vectorised index_add, not index_put)
    dtype = torch.promote_types(x.dtype, update.dtype)
    out, start = x.to(dtype, copy=True), 0
    for (b, _), (keep, n), group_rows in zip(seqs, sub_seqs, rows, strict=True):
        part, scale = update[start : start + keep * n], b / keep
        start += keep * n
        if dtype in (torch.float32, torch.float64):
            out.index_add_(0, group_rows, part.to(dtype), alpha=scale)
        else:  # a bf16/fp16 stream: rescale in fp32, round once
            out.index_add_(0, group_rows, (part.to(torch.float32) * scale).to(dtype))
    return out


def residual_with_drop_path(x: Tensor, seqs: Seqs, branch: Branch, p: float) -> Tensor:
    """x + branch(x) * per-sample Bernoulli(1 - p) / (1 - p) (classic DropPath)."""
    keep = [torch.bernoulli(torch.full((b,), 1.0 - p, device=x.device)) / (1.0 - p) for b, _ in seqs]
    per_row = torch.cat([k.repeat_interleave(n) for k, (_, n) in zip(keep, seqs, strict=True)])
    update = branch(x, seqs)
    dtype = torch.promote_types(x.dtype, update.dtype)
    return x.to(dtype) + (update.to(torch.float32) * per_row[:, None]).to(dtype)


def residual(x: Tensor, seqs: Seqs, branch: Branch, p: float, mode: str, training: bool) -> Tensor:
    """Apply one residual branch with stochastic depth rate ``p`` when training."""
    if not training or p <= 0.0:
        return x + branch(x, seqs)
    if mode == "efficient":
        return residual_with_subset(x, seqs, branch, p)
    if mode == "classic":
        return residual_with_drop_path(x, seqs, branch, p)
    raise ValueError(f"unknown drop_path_mode '{mode}' (expected one of {MODES})")
