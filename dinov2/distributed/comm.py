"""Tiny collective helpers that degrade to no-ops when torch.distributed is not in use.

Losses call these so that the same code runs on one process (CPU or GPU) and on many ranks.
"""

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when torch.distributed is available and a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default process group (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place across all ranks (no-op when not distributed). Returns ``t``."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``t`` in place across all ranks (no-op when not distributed). Returns ``t``."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
