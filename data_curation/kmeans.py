"""Hierarchical k-means with resampling (Vo et al. 2024, "Automatic data curation for
self-supervised learning: a clustering-based approach"), on faiss k-means.

Plain k-means on web-scale data puts most centroids where the data is dense: a few dominant
concepts get many clusters and the long tail gets few. The paper's remedy has two parts:

* **Hierarchy.** Level 1 runs k-means on the data; level ``l`` runs k-means on the ``k_{l-1}``
  centroids of level ``l - 1`` (each centroid counts once, whatever its cluster's size), so the
  upper levels see a much flatter distribution. A data point's level-``l`` cluster is the
  level-``l`` cluster of its level-``l - 1`` cluster.
* **Resampling.** After k-means at a level, repeat ``n_resampling_steps`` times: from every
  cluster take the ``sample_size`` inputs closest to its centroid (all of them if fewer), re-run
  k-means on that union (initialised from the current centroids), and re-assign every input to
  the new centroids. Each cluster contributes the same number of points to the re-fit, so dense
  regions no longer pull centroids towards themselves and the centroids spread more uniformly
  over the support of the data. This is our reading of the paper's resampling-clustering step,
  kept deliberately simple.

With ``spherical=True`` centroids are L2-normalised and inputs are assigned by cosine similarity
(the embeddings are normalised); otherwise by Euclidean distance. Assignment "scores" are
higher-is-closer: the cosine similarity, or the negated squared distance.

Stage outputs (``<workdir>/cluster/``): ``pool.npy`` (global rows that were clustered, in order),
and per level ``l = 1..L``: ``level{l}_centroids.npy`` (k_l, d), ``level{l}_assign.npy`` (the
level-``l`` cluster of each level-``l`` input: pool points for ``l = 1``, level-``l-1`` clusters
above), ``level{l}_score.npy`` and a ``level{l}.json`` marker that lets an interrupted run resume
after the last finished level; ``DONE``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from data_curation import embeddings as emb_io
from data_curation.atomic import save_npy, write_json
from data_curation.config import CurationConfig
from data_curation.errors import CurationError
from data_curation.index import build_index, import_faiss, search, want_gpu
from data_curation.workdir import fingerprint, funnel, load_selection, resolve_path, resolve_selection, run_stage

log = logging.getLogger(__name__)


@dataclass
class Level:
    """One level of the hierarchy."""

    centroids: np.ndarray  # (k, d) float32
    assign: np.ndarray  # (n_inputs,) int64: cluster of each input of this level
    score: np.ndarray  # (n_inputs,) float32: closeness of each input to its centroid


_INIT_METHODS = MappingProxyType({"kmeans++": "KMEANS_PLUS_PLUS", "afkmc2": "AFK_MC2"})


def _init_method(faiss: Any, init: str) -> Any:
    """The faiss ClusteringInitMethod for ``init`` (kmeans++ / afkmc2 need faiss >= 1.13)."""
    if init not in _INIT_METHODS:
        raise ValueError(f"k-means init must be random, kmeans++ or afkmc2, got {init!r}")
    name = f"ClusteringInitMethod_{_INIT_METHODS[init]}"
    if not hasattr(faiss, name):
        raise RuntimeError(f"k-means init={init} needs a newer faiss (ClusteringParameters.init_method)")
    return getattr(faiss, name)


def train_kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = True,
    init_centroids: np.ndarray | None = None,
    max_points_per_centroid: int = 256,
    use_gpu: str | bool = "auto",
    verbose: bool = False,
    init: str = "kmeans++",
) -> np.ndarray:
    """Centroids (k, d) float32 of faiss k-means on ``x`` (subsampled to k·max_points_per_centroid).

    ``init``: ``random`` (k distinct input points), ``kmeans++`` (D²-weighted seeding, which
    avoids piling several initial centroids into one dense region) or ``afkmc2`` (a cheaper MCMC
    approximation of kmeans++). Ignored when ``init_centroids`` is given.
    """
    faiss = import_faiss()
    if k > len(x):
        raise ValueError(f"cannot make {k} clusters from {len(x)} points")
    extra = {}
    if init != "random":
        extra["init_method"] = _init_method(faiss, init)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,  # small inputs (upper levels) are expected: no warning
        gpu=want_gpu(use_gpu),
        verbose=verbose,
        **extra,
    )
    start = None if init_centroids is None else np.ascontiguousarray(init_centroids, dtype=np.float32)
    km.train(np.ascontiguousarray(x, dtype=np.float32), init_centroids=start)
    return np.asarray(km.centroids, dtype=np.float32)


def assign(
    x: np.ndarray,
    centroids: np.ndarray,
    spherical: bool = True,
    batch_size: int = 65536,
    use_gpu: str | bool = "auto",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: (labels int64, score float32 — higher is closer)."""
    metric = "ip" if spherical else "l2"
    index = build_index(centroids, kind="flat", metric=metric, use_gpu=use_gpu)
    scores, ids = search(index, x, 1, batch_size=batch_size, progress=progress)
    score = scores[:, 0] if spherical else -scores[:, 0]
    return ids[:, 0], score


def closest_per_cluster(labels: np.ndarray, score: np.ndarray, r: int) -> np.ndarray:
    """Indices of the ``r`` highest-score members of every cluster (all members when fewer)."""
    order = np.lexsort((-score, labels))
    sorted_labels = labels[order]
    group_start = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[group_start, len(order)])
    rank = np.arange(len(order)) - np.repeat(group_start, sizes)
    return np.sort(order[rank < r])


def kmeans_with_resampling(
    x: np.ndarray,
    k: int,
    n_resampling_steps: int = 0,
    sample_size: int = 0,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = True,
    max_points_per_centroid: int = 256,
    use_gpu: str | bool = "auto",
    verbose: bool = False,
    init: str = "kmeans++",
) -> Level:
    """k-means on ``x`` followed by ``n_resampling_steps`` resampling steps (module docstring)."""
    if n_resampling_steps and sample_size < 1:
        raise ValueError("resampling needs sample_size >= 1 (points taken from each cluster)")
    opts = dict(
        niter=niter,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        use_gpu=use_gpu,
        verbose=verbose,
    )
    centroids = train_kmeans(x, k, seed=seed, init=init, **opts)
    labels, score = assign(x, centroids, spherical, use_gpu=use_gpu)
    for step in range(n_resampling_steps):
        picked = closest_per_cluster(labels, score, sample_size)
        if len(picked) < k:  # too many empty clusters to re-fit k centroids
            log.warning("resampling step %d skipped: %d sampled points for %d clusters", step, len(picked), k)
            break
        centroids = train_kmeans(x[picked], k, seed=seed + step + 1, init_centroids=centroids, **opts)
        labels, score = assign(x, centroids, spherical, use_gpu=use_gpu)
    return Level(centroids, labels, score)


def _per_level(values: Sequence[int] | int, n_levels: int, name: str) -> list[int]:
    """A per-level setting: one value for all levels, or a list with one value per level."""
    if isinstance(values, int):
        return [values] * n_levels
    values = list(values)
    if len(values) == 1:
        return values * n_levels
    if len(values) != n_levels:
        raise ValueError(f"{name} has {len(values)} values for {n_levels} levels")
    return values


def hierarchical_kmeans(
    x: np.ndarray,
    n_clusters: Sequence[int],
    n_resampling_steps: Sequence[int] | int = 0,
    sample_size: Sequence[int] | int = 0,
    seed: int = 0,
    done_levels: Sequence[Level] = (),
    on_level: Callable[[int, Level], None] | None = None,
    **kmeans_options: Any,
) -> list[Level]:
    """Levels 1..L of hierarchical k-means; level l clusters the centroids of level l - 1.

    ``kmeans_options`` are :func:`kmeans_with_resampling`'s (``niter``, ``spherical``,
    ``max_points_per_centroid``, ``use_gpu``, ``verbose``, ``init``), the same at every level;
    level l is seeded ``seed + 1000 * l``.

    ``done_levels`` are already computed levels to resume from; ``on_level(l, level)`` is called
    after each newly computed level (l starts at 1), e.g. to save it.
    """
    n_levels = len(n_clusters)
    steps = _per_level(n_resampling_steps, n_levels, "n_resampling_steps")
    sizes = _per_level(sample_size, n_levels, "sample_size")
    levels = list(done_levels)
    for l in range(len(levels), n_levels):
        inputs = x if l == 0 else levels[-1].centroids
        log.info("k-means level %d: %d inputs -> %d clusters", l + 1, len(inputs), n_clusters[l])
        level = kmeans_with_resampling(
            inputs,
            n_clusters[l],
            steps[l],
            sizes[l],
            seed=seed + 1000 * (l + 1),
            **kmeans_options,
        )
        levels.append(level)
        if on_level is not None:
            on_level(l + 1, level)
    return levels


def point_labels(levels: Sequence[Level]) -> list[np.ndarray]:
    """The cluster of every data point at each level (composition of the per-level assignments)."""
    labels = [levels[0].assign]
    for level in levels[1:]:
        labels.append(level.assign[labels[-1]])
    return labels


def save_level(folder: Path, l: int, level: Level, fp: str) -> None:
    """Write level ``l``'s files, then its marker (the marker means the level is complete)."""
    save_npy(folder / f"level{l}_centroids.npy", level.centroids)
    save_npy(folder / f"level{l}_assign.npy", level.assign)
    save_npy(folder / f"level{l}_score.npy", level.score)
    write_json(folder / f"level{l}.json", {"fingerprint": fp, "k": len(level.centroids)})


def load_levels(folder: str | Path, fp: str | None = None) -> list[Level]:
    """The complete levels 1, 2, ... saved in ``folder`` (only those whose marker matches ``fp``)."""
    folder = Path(folder)
    levels: list[Level] = []
    while (marker := folder / f"level{len(levels) + 1}.json").is_file():
        if fp is not None and json.loads(marker.read_text()).get("fingerprint") != fp:
            break
        l = len(levels) + 1
        levels.append(
            Level(
                np.load(folder / f"level{l}_centroids.npy"),
                np.load(folder / f"level{l}_assign.npy"),
                np.load(folder / f"level{l}_score.npy"),
            )
        )
    return levels


def check_levels(n_clusters: Sequence[int], n_points: int, source: str) -> None:
    """One-line error unless every level asks for at least one and fewer clusters than it has inputs."""
    sizes = [n_points, *n_clusters]
    bad = next((l for l in range(1, len(sizes)) if not 1 <= sizes[l] <= sizes[l - 1]), None)
    if n_points == 0 or bad is not None:
        hint = [max(1, n_points // 10**level) for level in range(1, len(n_clusters) + 1)]
        what = (
            "no images" if n_points == 0 else f"level {bad} asks for {sizes[bad]} clusters of {sizes[bad - 1]} inputs"
        )
        raise CurationError(
            f"cluster.n_clusters={list(n_clusters)} does not fit the {n_points:,} images of '{source}' ({what}); "
            f"each level needs at most as many clusters as inputs, e.g. cluster.n_clusters={hint}"
        )


def run_cluster(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``cluster`` stage: hierarchical k-means of the input selection (module docstring)."""
    cfg = cfg or CurationConfig()
    workdir = Path(workdir)
    c = cfg.cluster
    emb_dir = resolve_path(workdir, cfg.embeddings)
    emb_fp = emb_io.embeddings_fingerprint(emb_dir)
    selection = resolve_selection(workdir, c.input, ("decontaminate", "dedup"), emb_fp)
    fp = fingerprint("cluster", selection, c)

    def compute(out: Path) -> dict[str, Any]:
        x, _ = emb_io.load_embeddings(emb_dir)
        pool = load_selection(workdir, selection, emb_io.valid_rows(x))
        check_levels(c.n_clusters, len(pool), selection.name)
        for stale in range(len(c.n_clusters) + 1, 1000):  # levels of an earlier, deeper run
            if not (out / f"level{stale}.json").exists():
                break
            (out / f"level{stale}.json").unlink()
        done_levels = load_levels(out, fp) if not force else []
        if done_levels:
            log.info("cluster: resuming after level %d", len(done_levels))
        save_npy(out / "pool.npy", pool)
        levels = hierarchical_kmeans(
            x[pool],
            c.n_clusters,
            c.n_resampling_steps,
            c.sample_size,
            niter=c.niter,
            seed=c.seed,
            spherical=c.spherical,
            max_points_per_centroid=c.max_points_per_centroid,
            use_gpu=cfg.index.use_gpu,
            verbose=log.isEnabledFor(logging.DEBUG),  # faiss prints every iteration: --log-level debug
            init=c.init,
            done_levels=done_levels,
            on_level=lambda l, level: save_level(out, l, level, fp),
        )
        per_level = []
        for l, labels in enumerate(point_labels(levels), start=1):
            counts = np.bincount(labels, minlength=len(levels[l - 1].centroids))
            per_level.append(
                {
                    "level": l,
                    "k": len(counts),
                    "n_empty": int((counts == 0).sum()),
                    "points_min": int(counts.min()),
                    "points_median": float(np.median(counts)),
                    "points_max": int(counts.max()),
                }
            )
        return {"input": selection.name, "n_points": len(pool), "levels": per_level, **funnel(len(pool), len(pool))}

    return run_stage(workdir, "cluster", fp, compute, force)
