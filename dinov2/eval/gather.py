"""All-gather helpers for evaluation, no-ops when torch.distributed is not initialized.

Evaluation shards work across ranks (feature extraction, k-NN over a sharded train set) and then
needs every rank's result. ``all_gather`` requires equal shapes on every rank, so callers pad first;
these helpers only move tensors to the device the process group's backend can communicate on (CUDA
for NCCL, CPU otherwise) and back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dinov2.distributed.comm import is_distributed, world_size


def comm_device() -> torch.device:
    """The device collectives run on: the current CUDA device for NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_stacked(t: Tensor) -> Tensor:
    """Every rank's ``t`` (same shape and dtype everywhere) stacked as ``(world, *t.shape)``.

    The result is on ``t``'s device. Not distributed: ``t.unsqueeze(0)``.
    """
    if not is_distributed():
        return t.unsqueeze(0)
    device = comm_device()
    local = t.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts).to(t.device)


def all_reduce_int(value: int, op: str = "sum") -> int:
    """``value`` summed (``op="sum"``) or maximized (``op="max"``) over ranks."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return int(t.item())
