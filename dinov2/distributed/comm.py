"""The one home of rank, world size, barrier and the tiny collectives, each a no-op (or rank 0 of 1)
when torch.distributed is not in use.

Losses, evaluation, checkpointing and the stop request call these so that the same code runs on one
process (CPU or GPU) and on many ranks.
"""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is available and a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default process group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``, ``(0, 1)`` when not distributed."""
    return rank(), world_size()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place across all ranks (no-op when not distributed). Returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``t`` in place across all ranks (no-op when not distributed). Returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
