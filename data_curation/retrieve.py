"""Retrieval: select the pool images that resemble curated query datasets (DINOv2, LVD-142M).

Each query set (an embeddings directory of a curated dataset) uses one of two methods:

* ``sample``: the ``k`` nearest pool images of every query image (optionally only those with cosine
  similarity of at least ``min_similarity``) — for large query sets;
* ``cluster``: the pool is clustered with k-means (``retrieve.n_clusters``); every query image is
  assigned to its nearest centroid, and each cluster holding at least ``min_queries`` query images
  contributes up to ``per_cluster`` of its images (random, or closest to the centroid) — for small
  query sets, where nearest neighbours alone would retrieve too few images.

The selections of all query sets are united (each image once). The pool is the ``input``
selection (auto: decontaminate, else dedup, else every usable row).

Stage outputs (``<workdir>/retrieve/``): ``selected.npy`` (sorted global rows), ``report.json``
(per query set: method, queries, images retrieved, new images), ``pool_centroids.npy`` and
``pool_assign.npy`` (cluster of each input row, input rows in ascending order) when a query set
uses clusters, ``DONE``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from data_curation import embeddings as emb_io
from data_curation.atomic import save_npy, write_json
from data_curation.config import CurationConfig, IndexConfig, RetrieveConfig
from data_curation.errors import CurationError
from data_curation.index import index_from_config, search
from data_curation.kmeans import assign, train_kmeans
from data_curation.workdir import (
    fingerprint,
    funnel,
    load_selection,
    resolve_path,
    resolve_selection,
    run_stage,
)

log = logging.getLogger(__name__)


def sample_based(
    pool: np.ndarray,
    queries: np.ndarray,
    k: int,
    min_similarity: float = -1.0,
    index: Any = None,
    index_cfg: IndexConfig | None = None,
    batch_size: int = 16384,
    progress: bool = False,
) -> np.ndarray:
    """Sorted unique pool indices among the ``k`` nearest neighbours of any query."""
    index = index if index is not None else index_from_config(pool, index_cfg or IndexConfig())
    sims, ids = search(index, queries, k, batch_size=batch_size, progress=progress)
    return np.unique(ids[(ids >= 0) & (sims >= min_similarity)])


def cluster_based(
    pool_labels: np.ndarray,
    pool_score: np.ndarray,
    query_labels: np.ndarray,
    n_clusters: int,
    min_queries: int,
    per_cluster: int,
    pick: str = "random",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted pool indices, selected cluster ids): up to ``per_cluster`` images from every cluster
    holding at least ``min_queries`` queries; ``pick`` is ``random`` or ``closest`` (by ``pool_score``).
    """
    if pick not in ("random", "closest"):
        raise ValueError(f"cluster_pick must be random or closest, got {pick!r}")
    hits = np.bincount(query_labels, minlength=n_clusters)
    chosen = np.flatnonzero(hits >= min_queries)
    rng = np.random.default_rng(seed)
    order = np.argsort(pool_labels, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(pool_labels, minlength=n_clusters))]
    picked = []
    for c in chosen:
        members = order[bounds[c] : bounds[c + 1]]
        if len(members) > per_cluster:
            if pick == "random":
                members = rng.choice(members, size=per_cluster, replace=False)
            else:
                members = members[np.argsort(-pool_score[members], kind="stable")[:per_cluster]]
        picked.append(members)
    selected = np.unique(np.concatenate(picked)) if picked else np.empty(0, np.int64)
    return selected, chosen


def run_retrieve(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``retrieve`` stage (see the module docstring); needs ``retrieve.query_sets``."""
    cfg = cfg or CurationConfig()
    workdir = Path(workdir)
    r = cfg.retrieve
    if not r.query_sets:
        raise ValueError("retrieve.query_sets is empty: give at least one query embeddings dir")
    for q in r.query_sets:
        if q.method not in ("sample", "cluster"):
            raise ValueError(f"query set {q.path}: method must be sample or cluster, got {q.method!r}")
    emb_dir = resolve_path(workdir, cfg.embeddings)
    query_dirs = [resolve_path(workdir, q.path) for q in r.query_sets]
    selection = resolve_selection(workdir, r.input, ("decontaminate", "dedup"), emb_io.embeddings_fingerprint(emb_dir))
    fp = fingerprint("retrieve", selection, [emb_io.embeddings_fingerprint(d) for d in query_dirs], r, cfg.index)

    def compute(out: Path) -> dict[str, Any]:
        x, _ = emb_io.load_embeddings(emb_dir)
        pool_rows = load_selection(workdir, selection, emb_io.valid_rows(x))
        pool = x[pool_rows]
        _check_inputs(r, len(pool), x.shape[1], query_dirs)
        index = None
        clusters = None
        selected = np.empty(0, np.int64)
        per_set = []
        for q, qdir in zip(r.query_sets, query_dirs):
            queries, _ = emb_io.load_embeddings(qdir)
            entry = {"name": q.name or qdir.name, "method": q.method, "n_queries": len(queries)}
            if q.method == "sample":
                if index is None:
                    index = index_from_config(pool, cfg.index, seed=r.seed)
                found = sample_based(
                    pool,
                    queries,
                    q.k,
                    q.min_similarity,
                    index=index,
                    batch_size=cfg.index.batch_size,
                    progress=cfg.progress,
                )
            else:
                if clusters is None:
                    clusters = _pool_clusters(pool, r, cfg, out)
                query_labels, _ = assign(queries, clusters[0], use_gpu=cfg.index.use_gpu)
                found, chosen = cluster_based(
                    clusters[1],
                    clusters[2],
                    query_labels,
                    r.n_clusters,
                    q.min_queries,
                    q.per_cluster,
                    r.cluster_pick,
                    r.seed,
                )
                entry["n_clusters_selected"] = len(chosen)
            entry["n_retrieved"] = len(found)
            entry["n_new"] = int((~np.isin(found, selected)).sum())
            selected = np.union1d(selected, found)
            per_set.append(entry)
            log.info("retrieve: %s", entry)
        save_npy(out / "selected.npy", pool_rows[selected])
        summary = {
            "input": selection.name,
            "n_pool": len(pool_rows),
            "n_selected": len(selected),
            "query_sets": per_set,
            **funnel(len(pool_rows), len(selected)),
        }
        write_json(out / "report.json", summary)
        return summary

    return run_stage(workdir, "retrieve", fp, compute, force)


def _check_inputs(r: RetrieveConfig, n_pool: int, dim: int, query_dirs: list[Path]) -> None:
    """One-line errors for a retrieval that cannot work, before any search."""
    if n_pool == 0:
        raise CurationError("retrieve: the input selection is empty")
    if any(q.method == "cluster" for q in r.query_sets) and not 1 <= r.n_clusters <= n_pool:
        raise CurationError(f"retrieve.n_clusters={r.n_clusters} must be between 1 and the {n_pool:,} pool images")
    for q, qdir in zip(r.query_sets, query_dirs):
        if q.method == "sample" and q.k < 1:
            raise CurationError(f"query set {q.path}: k must be at least 1")
        emb_io.check_dim(qdir, dim, f"query set {qdir}")


def _pool_clusters(pool: np.ndarray, r: RetrieveConfig, cfg: CurationConfig, out: Path) -> tuple[np.ndarray, ...]:
    """k-means of the pool for cluster-based retrieval: (centroids, labels, scores), saved in ``out``."""
    log.info("retrieve: k-means of the pool into %d clusters", r.n_clusters)
    verbose = log.isEnabledFor(logging.DEBUG)  # faiss prints every k-means iteration
    centroids = train_kmeans(
        pool, r.n_clusters, niter=r.niter, seed=r.seed, use_gpu=cfg.index.use_gpu, verbose=verbose, init=r.init
    )
    labels, score = assign(pool, centroids, use_gpu=cfg.index.use_gpu)
    save_npy(out / "pool_centroids.npy", centroids)
    save_npy(out / "pool_assign.npy", labels)
    return centroids, labels, score
