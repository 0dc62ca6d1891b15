"""The running top-k: the ``k`` best scores of each query row over a database scored chunk by chunk,
with a payload (a label, a row id) carried along. The k-NN classifier and the curation's torch index
both search this way, so that nothing of size ``queries × database`` is ever built."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def merge_topk(scores: Tensor, payload: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top ``k`` (sorted, descending) of ``scores (Q, M)`` with their ``payload (Q, M)``; fewer when
    ``M < k``."""
    values, idx = scores.topk(min(k, scores.shape[1]), dim=1)
    return values, payload.gather(1, idx)


def running_topk(chunks: Iterable[tuple[Tensor, Tensor]], k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` over ``chunks`` of ``(scores (Q, C), payload (C,) or (Q, C))``, merged as they come:
    memory is bounded by one chunk's scores plus ``Q × k``."""
    best: tuple[Tensor, Tensor] | None = None
    for scores, payload in chunks:
        if payload.dim() == 1:
            payload = payload.expand(scores.shape[0], -1)
        top = merge_topk(scores, payload, k)
        if best is not None:
            top = merge_topk(torch.cat([best[0], top[0]], 1), torch.cat([best[1], top[1]], 1), k)
        best = top
    if best is None:
        raise ValueError("running_topk needs at least one chunk")
    return best
