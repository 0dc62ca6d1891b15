"""Weighted k-nearest-neighbour classification on frozen features (the DINO k-NN protocol).

For each test feature: cosine similarity to every train feature, the ``max(ks)`` most similar train
features (sorted), and for each ``k`` a vote over the first ``k`` of them where a neighbour of
similarity ``s`` adds ``exp(s / T)`` to its class; the prediction is the class with the most weight
(ties go to the smaller class index). One neighbour search serves every ``k``.

Memory stays bounded: test queries are processed ``batch_size`` at a time and the train set
``train_chunk_size`` rows at a time, keeping a running top-k, so nothing of size
``num_test × num_train`` is ever built. Features are L2-normalized here (a no-op for features that
already are), chunk by chunk, so no normalized copy of the train set is made.

Distributed (``distributed=True`` with an initialized process group): each rank passes its own shard
of the train set and the *same* test features; each rank finds its local top-k, the candidates are
all-gathered and merged into the global top-k, and every rank returns the same result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov2.distributed.comm import is_distributed
from dinov2.eval.gather import all_gather_stacked, all_reduce_int
from dinov2.eval.topk import merge_topk, running_topk

DEFAULT_KS = (10, 20, 100, 200)


def _local_topk(queries: Tensor, train: Tensor, train_labels: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Running top-``k`` cosine neighbours of ``queries`` over ``train``, ``chunk`` rows at a time."""
    if train.shape[0] == 0:
        return queries.new_empty((queries.shape[0], 0)), train_labels.new_empty((queries.shape[0], 0))
    blocks = (
        (queries @ F.normalize(train[start : start + chunk].float(), dim=1).T, train_labels[start : start + chunk])
        for start in range(0, train.shape[0], chunk)
    )
    return running_topk(blocks, k)


def _global_topk(local_s: Tensor, local_l: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Merge every rank's local top-k (padded to ``k`` with -inf) into the global top-k."""
    pad = k - local_s.shape[1]
    if pad:
        local_s = F.pad(local_s, (0, pad), value=float("-inf"))
        local_l = F.pad(local_l, (0, pad), value=0)
    all_s = all_gather_stacked(local_s).permute(1, 0, 2).flatten(1)  # (Q, world * k)
    all_l = all_gather_stacked(local_l).permute(1, 0, 2).flatten(1)
    return merge_topk(all_s, all_l, k)


def weighted_vote(sims: Tensor, labels: Tensor, k: int, temperature: float, num_classes: int) -> Tensor:
    """Predicted class ``(Q,)`` from the first ``k`` of the sorted neighbours ``sims, labels (Q, K)``.

    Weights are ``exp(s / T)``; they are computed relative to each row's best similarity, which
    scales a row's votes by one constant and so leaves the decision unchanged while avoiding
    overflow.
    """
    s, l = sims[:, :k], labels[:, :k]
    weights = torch.exp((s - s[:, :1]) / temperature)
    votes = torch.zeros(s.shape[0], num_classes, dtype=weights.dtype, device=s.device)
    votes.scatter_add_(1, l, weights)
    return votes.argmax(dim=1)


def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
    *,
    train_chunk_size: int = 65536,
    device: str | torch.device | None = None,
    distributed: bool = False,
) -> dict[int, Tensor]:
    """``{k: predicted class (num_test,) int64 on the CPU}`` for each ``k`` in ``ks``.

    ``num_classes`` defaults to ``max(train_labels) + 1`` (over all ranks when distributed);
    ``device`` (default: the train features') is where the similarities are computed; the train
    features are moved there once. A ``k`` larger than the train set uses every train feature.
    See the module docstring.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} train features but {train_labels.shape[0]} labels")
    if train_labels.numel() and int(train_labels.min()) < 0:
        raise ValueError("k-NN needs labelled train data (found negative labels)")
    sharded = distributed and is_distributed()
    num_train = all_reduce_int(train_feats.shape[0]) if sharded else train_feats.shape[0]
    if num_train == 0:
        raise ValueError("k-NN needs at least one train feature")
    if num_classes is None:
        local_max = int(train_labels.max()) if train_labels.numel() else 0
        num_classes = (all_reduce_int(local_max, "max") if sharded else local_max) + 1
    device = torch.device(device) if device is not None else train_feats.device
    max_k = min(max(ks), num_train)
    train_feats = train_feats.to(device)  # once, not per query batch (no copy when already there)
    train_labels = train_labels.to(device, torch.int64)
    preds: dict[int, list[Tensor]] = {k: [] for k in ks}
    with torch.no_grad():
        for start in range(0, test_feats.shape[0], batch_size):
            queries = F.normalize(test_feats[start : start + batch_size].to(device, torch.float32), dim=1)
            sims, labels = _local_topk(queries, train_feats, train_labels, max_k, train_chunk_size)
            if sharded:
                sims, labels = _global_topk(sims, labels, max_k)
            for k in ks:
                preds[k].append(weighted_vote(sims, labels, min(k, max_k), temperature, num_classes).cpu())
    empty = torch.empty(0, dtype=torch.int64)
    return {k: torch.cat(p) if p else empty for k, p in preds.items()}


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
    *,
    train_chunk_size: int = 65536,
    device: str | torch.device | None = None,
    distributed: bool = False,
) -> dict[int, float]:
    """``{k: top-1 accuracy in %}`` of :func:`knn_predict` against ``test_labels``."""
    if test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError(f"{test_feats.shape[0]} test features but {test_labels.shape[0]} labels")
    if test_feats.shape[0] == 0:
        raise ValueError("k-NN accuracy needs at least one test feature")
    preds = knn_predict(
        train_feats,
        train_labels,
        test_feats,
        ks,
        temperature,
        num_classes,
        batch_size,
        train_chunk_size=train_chunk_size,
        device=device,
        distributed=distributed,
    )
    target = test_labels.to(torch.int64).cpu()
    return {k: 100.0 * (p == target).double().mean().item() for k, p in preds.items()}
