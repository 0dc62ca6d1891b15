"""Balanced hierarchical sampling from a hierarchical k-means tree (Vo et al. 2024).

To draw ``target_size`` images, the budget is split as evenly as possible across the top-level
clusters, then each cluster's share is split evenly across its children one level down, and so on
down to the level-1 clusters, where that many points are picked (uniformly at random, or the ones
closest to the centroid). A cluster smaller than its even share takes all its points and the
surplus goes to its siblings ("water-filling", :func:`water_fill`), so the result has exactly
``min(target_size, pool size)`` images and every concept gets the same budget unless it runs out.

Stage outputs (``<workdir>/sample/``): ``selected.npy`` (sorted global rows), ``report.json``,
``DONE``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_curation.atomic import save_npy, write_json
from data_curation.config import CurationConfig
from data_curation.errors import CurationError
from data_curation.kmeans import Level, load_levels, point_labels
from data_curation.workdir import fingerprint, funnel, read_done, run_stage

log = logging.getLogger(__name__)


def water_fill(capacities: np.ndarray, budget: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Integer allocation ``a`` with ``a <= capacities``, ``sum(a) = min(budget, sum(capacities))``,
    as equal as possible: ``a_i = min(c_i, t)`` for a level t, and the remainder (fewer units than
    clusters still above t) given one each to clusters above t, chosen at random (or the first ones
    when ``rng`` is None).
    """
    caps = np.asarray(capacities, dtype=np.int64)
    budget = int(min(budget, caps.sum()))
    if budget <= 0:
        return np.zeros_like(caps)
    # largest level t with sum(min(caps, t)) <= budget, by bisection on [0, max(caps)]
    lo, hi = 0, int(caps.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(caps, mid).sum() <= budget:
            lo = mid
        else:
            hi = mid - 1
    alloc = np.minimum(caps, lo)
    remainder = budget - int(alloc.sum())
    if remainder:
        room = np.flatnonzero(caps > lo)  # remainder < len(room), else lo + 1 would have fitted
        extra = room[:remainder] if rng is None else rng.choice(room, size=remainder, replace=False)
        alloc[extra] += 1
    return alloc


def _children(parent_of: np.ndarray, n_parents: int) -> list[np.ndarray]:
    """For each parent cluster, the indices of the items assigned to it."""
    order = np.argsort(parent_of, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(parent_of, minlength=n_parents))]
    return [order[bounds[p] : bounds[p + 1]] for p in range(n_parents)]


def balanced_hierarchical_sample(
    levels: Sequence[Level],
    target_size: int,
    leaf_selection: str = "random",
    seed: int = 0,
) -> np.ndarray:
    """Sorted indices (into level 1's inputs, the pool) of a balanced sample of ``target_size``."""
    if leaf_selection not in ("random", "closest"):
        raise ValueError(f"leaf_selection must be random or closest, got {leaf_selection!r}")
    rng = np.random.default_rng(seed)
    # number of pool points under each cluster, per level
    counts = [np.bincount(levels[0].assign, minlength=len(levels[0].centroids))]
    for level in levels[1:]:
        counts.append(np.bincount(level.assign, weights=counts[-1], minlength=len(level.centroids)).astype(np.int64))
    # top-down: split each cluster's budget across its children
    budget = water_fill(counts[-1], target_size, rng)
    for l in range(len(levels) - 1, 0, -1):
        child_budget = np.zeros(len(counts[l - 1]), dtype=np.int64)
        for parent, kids in enumerate(_children(levels[l].assign, len(counts[l]))):
            if budget[parent]:
                child_budget[kids] = water_fill(counts[l - 1][kids], budget[parent], rng)
        budget = child_budget
    # leaves: pick budget[c] points in each level-1 cluster
    picked = []
    for cluster, members in enumerate(_children(levels[0].assign, len(counts[0]))):
        b = budget[cluster]
        if b == 0:
            continue
        if leaf_selection == "random":
            picked.append(rng.choice(members, size=b, replace=False))
        else:
            picked.append(members[np.argsort(-levels[0].score[members], kind="stable")[:b]])
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)


def entropy(labels: np.ndarray) -> float:
    """Shannon entropy (nats) of the empirical distribution of ``labels``."""
    p = np.bincount(labels) / max(len(labels), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def run_sample(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``sample`` stage: balanced sample of the ``cluster`` stage's pool (module docstring)."""
    cfg = cfg or CurationConfig()
    workdir = Path(workdir)
    s = cfg.sample
    cluster_done = read_done(workdir, "cluster")
    if cluster_done is None:
        raise FileNotFoundError(f"the cluster stage has not finished in {workdir}; run it first")
    fp = fingerprint("sample", cluster_done["fingerprint"], s)

    def compute(out: Path) -> dict[str, Any]:
        folder = workdir / "cluster"
        levels = load_levels(folder, cluster_done["fingerprint"])
        n_levels = len(cluster_done["summary"]["levels"])
        if len(levels) < n_levels:
            raise FileNotFoundError(f"{folder}: found {len(levels)} of {n_levels} levels; re-run cluster")
        levels = levels[:n_levels]
        pool = np.load(folder / "pool.npy")
        if not 1 <= s.target_size <= len(pool):
            raise CurationError(
                f"sample.target_size={s.target_size:,} but the cluster stage holds {len(pool):,} images: set "
                f"sample.target_size between 1 and {len(pool):,} (or leave the sample stage out)"
            )
        local = balanced_hierarchical_sample(levels, s.target_size, s.leaf_selection, s.seed)
        selected = pool[local]
        save_npy(out / "selected.npy", selected)
        top = point_labels(levels)[-1]
        summary = {
            "target_size": s.target_size,
            "n_selected": len(selected),
            "n_pool": len(pool),
            "leaf_selection": s.leaf_selection,
            "top_level_entropy_pool": entropy(top),
            "top_level_entropy_selected": entropy(top[local]),
            **funnel(len(pool), len(selected)),
        }
        write_json(
            out / "report.json",
            {**summary, "per_top_cluster": np.bincount(top[local], minlength=len(levels[-1].centroids)).tolist()},
        )
        log.info("sample: %s", json.dumps(summary))
        return summary

    return run_stage(workdir, "sample", fp, compute, force)
