"""Train / query sides for k-NN when only one set of images is given: a fixed, named held-out fraction.

A folder without splits used as both the memory bank and the queries scores every query against
itself (its own feature is its nearest neighbour): the number printed is not a held-out accuracy.
:func:`holdout_split` instead keeps a fixed draw of ``fraction`` of the images as queries and the rest
as the bank, and :func:`holdout_note` says so wherever the score is printed. The draw depends on the
number of images only (seed 0), so every evaluation of the same set uses the same queries.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Dataset, Subset


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(bank indices, query indices)``: ``ceil(fraction * n)`` queries drawn without replacement."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"cannot hold out part of {n} image(s)")
    num_queries = min(n - 1, max(1, math.ceil(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[num_queries:].tolist()), sorted(order[:num_queries].tolist())


def holdout_sets(dataset: Dataset, fraction: float) -> tuple[Subset, Subset]:
    """``(bank, queries)`` subsets of ``dataset`` (see :func:`holdout_split`)."""
    bank, queries = holdout_split(len(dataset), fraction)  # type: ignore[arg-type]
    return Subset(dataset, bank), Subset(dataset, queries)


def holdout_note(fraction: float, num_queries: int, seen_in_training: bool) -> str:
    """How to label a score on held-out queries of the train images."""
    seen = "; the model trained on them, so this is not a validation score" if seen_in_training else ""
    return (
        f"queries: {num_queries} images ({fraction:.0%}) held out of the train images' memory bank{seen} "
        "(give a test split or a second dataset for one)"
    )


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Every label of an image dataset (its ``labels`` array, or ``label(i)`` for each record)."""
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels) == len(dataset):  # type: ignore[arg-type]
        return np.asarray(labels, dtype=np.int64)
    label = getattr(dataset, "label", None)
    if label is not None:
        return np.array([label(i) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]
