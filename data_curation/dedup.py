"""Copy detection: near-duplicate pairs → graph → connected components → one image per component.

Two images are duplicates when one is among the other's ``k`` nearest neighbours with cosine
similarity strictly above ``threshold`` (``auto``, the default: the threshold ``calibrate`` picks for this
embedding, see ``data_curation.calibrate``). Duplicates form an undirected graph; each connected
component (transitively linked near-copies) keeps exactly one member, chosen by a rule:

* ``first``: the smallest row index (deterministic, follows the input order);
* ``random``: a uniformly random member (``seed``);
* ``most_connected``: the member with the most duplicate edges (ties: smallest index);
* ``centroid``: the member most similar to the component's mean embedding;
* ``score``: the member with the highest value in ``score_file`` (e.g. resolution or quality).

Stage outputs (``<workdir>/dedup/``): ``kept.npy`` (sorted global rows), ``labels.npy`` (component
per row, -1 for unusable rows), ``pairs.npy`` (structured i, j, sim with i < j), ``components.json``
(counts, size histogram, the largest components with member paths), ``skipped.txt`` (rows whose
embedding is not finite/normalised), ``DONE``.

Guardrail: a run that would remove more than ``dedup.max_removed_fraction`` of the images (default
half) stops before writing anything, with one line pointing to ``calibrate`` — a threshold too low for
the embedding links everything into one component — unless ``--force`` is given.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from data_curation import embeddings as emb_io
from data_curation.atomic import save_npy, write_json, write_lines
from data_curation.calibrate import resolved_threshold
from data_curation.config import CurationConfig, DedupConfig, IndexConfig
from data_curation.errors import CurationError
from data_curation.index import index_from_config, iter_search
from data_curation.union_find import connected_components
from data_curation.workdir import (
    check_removed_fraction,
    file_fingerprint,
    fingerprint,
    funnel,
    resolve_path,
    run_stage,
)

log = logging.getLogger(__name__)

PAIR_DTYPE = np.dtype([("i", np.int64), ("j", np.int64), ("sim", np.float32)])
KEEP_RULES = ("first", "random", "most_connected", "centroid", "score")


def find_duplicate_pairs(
    emb: np.ndarray,
    k: int = 64,
    threshold: float = 0.6,
    index_cfg: IndexConfig | None = None,
    batch_size: int = 16384,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, sim) with i < j, sim > threshold and one of them among the other's k-NN.

    ``emb`` holds L2-normalised rows. Each row is searched against all rows for ``k + 1``
    neighbours (itself included); the self match is dropped and symmetric duplicates merged.
    Only the pairs above threshold are kept from each batch, so memory stays bounded.
    """
    if len(emb) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    cfg = index_cfg or IndexConfig()
    index = index_from_config(emb, cfg)
    found_i, found_j, found_s = [], [], []
    for start, sims, ids in iter_search(index, emb, k + 1, batch_size=batch_size, progress=progress):
        rows = np.arange(start, start + len(ids), dtype=np.int64)[:, None]
        hit = (sims > threshold) & (ids >= 0) & (ids != rows)
        r, c = np.nonzero(hit)
        a, b = rows[r, 0], ids[r, c]
        found_i.append(np.minimum(a, b))
        found_j.append(np.maximum(a, b))
        found_s.append(sims[r, c])
    i = np.concatenate(found_i) if found_i else np.empty(0, np.int64)
    j = np.concatenate(found_j) if found_j else np.empty(0, np.int64)
    s = np.concatenate(found_s) if found_s else np.empty(0, np.float32)
    if i.size == 0:
        return i, j, s
    # merge (a, b) found from a and (b, a) found from b; keep the larger (equal up to rounding) sim
    order = np.lexsort((-s, j, i))
    i, j, s = i[order], j[order], s[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[first], j[first], s[first].astype(np.float32)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label (0..C-1, by smallest member) of each of ``n`` images linked by pairs i–j."""
    return connected_components(n, i, j)


def _first_in_order(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each component, the first member when members are visited in ``order``."""
    _, pos = np.unique(labels[order], return_index=True)
    return np.sort(order[pos])


def select_keep(
    labels: np.ndarray,
    rule: str = "first",
    seed: int = 0,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    emb: np.ndarray | None = None,
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted indices of the one member kept per component (see the module docstring for rules).

    ``most_connected`` needs ``pairs`` (i, j); ``centroid`` needs ``emb``; ``score`` needs ``scores``.
    """
    n = len(labels)
    index = np.arange(n, dtype=np.int64)
    if rule == "first":
        return _first_in_order(labels, index)
    if rule == "random":
        return _first_in_order(labels, np.random.default_rng(seed).permutation(n))
    if rule == "most_connected":
        if pairs is None:
            raise ValueError("keep rule 'most_connected' needs the duplicate pairs")
        degree = np.bincount(np.concatenate(pairs), minlength=n)
        return _first_in_order(labels, np.lexsort((index, -degree)))
    if rule == "score":
        if scores is None or len(scores) != n:
            raise ValueError("keep rule 'score' needs one score per image")
        return _first_in_order(labels, np.lexsort((index, -np.asarray(scores, dtype=np.float64))))
    if rule == "centroid":
        if emb is None:
            raise ValueError("keep rule 'centroid' needs the embeddings")
        return _first_in_order(labels, np.lexsort((index, -_similarity_to_component_mean(labels, emb))))
    raise ValueError(f"unknown keep rule {rule!r}; choose one of {KEEP_RULES}")


def _similarity_to_component_mean(labels: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of each image to its component's mean (1 for singletons)."""
    sizes = np.bincount(labels)
    sim = np.ones(len(labels), dtype=np.float32)
    members = np.flatnonzero(sizes[labels] > 1)
    if members.size == 0:
        return sim
    members = members[np.argsort(labels[members], kind="stable")]
    x = np.asarray(emb[members], dtype=np.float32)
    member_labels = labels[members]
    starts = np.flatnonzero(np.r_[True, member_labels[1:] != member_labels[:-1]])
    means = emb_io.l2_normalize(np.add.reduceat(x, starts, axis=0))
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(members)]))
    sim[members] = np.einsum("nd,nd->n", x, means[group])
    return sim


def size_histogram(labels: np.ndarray) -> dict[str, int]:
    """Number of components per size bucket: "1", "2-3", "4-7", "8-15", ... (powers of two)."""
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    hist: dict[str, int] = {}
    lo = 1
    while sizes.size and lo <= sizes.max():
        hi = 1 if lo == 1 else 2 * lo - 1
        count = int(((sizes >= lo) & (sizes <= hi)).sum())
        if count:
            hist[str(lo) if lo == hi else f"{lo}-{hi}"] = count
        lo = hi + 1
    return hist


def components_report(
    labels: np.ndarray,
    kept: np.ndarray,
    paths: list[str],
    top: int = 20,
    members: int = 50,
) -> dict[str, Any]:
    """Summary of the components: counts, size histogram, the ``top`` largest with member paths.

    ``labels``, ``kept`` and ``paths`` are aligned (local indices).
    """
    sizes = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
    kept_of = np.full(len(sizes), -1, dtype=np.int64)
    kept_of[labels[kept]] = kept
    largest = np.argsort(-sizes, kind="stable")[:top]
    largest = largest[sizes[largest] > 1]
    order = np.argsort(labels, kind="stable")
    starts = np.r_[0, np.cumsum(sizes)]
    report_largest = []
    for c in largest:
        member_rows = order[starts[c] : starts[c + 1]]
        report_largest.append(
            {
                "size": int(sizes[c]),
                "kept": paths[kept_of[c]],
                "members": [paths[r] for r in member_rows[:members]],
            }
        )
    return {
        "n_images": len(labels),
        "n_components": len(sizes),
        "n_kept": len(kept),
        "n_removed": len(labels) - len(kept),
        "n_in_duplicate_groups": int(sizes[sizes > 1].sum()),
        "size_histogram": size_histogram(labels),
        "largest_components": report_largest,
    }


def run_dedup(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``dedup`` stage: read the work dir's embeddings, write ``dedup/`` (see module docstring)."""
    cfg = cfg or CurationConfig()
    workdir = Path(workdir)
    emb_dir = resolve_path(workdir, cfg.embeddings)
    d, fp = dedup_settings(workdir, cfg)

    def compute(out: Path) -> dict[str, Any]:
        x, paths = emb_io.load_embeddings(emb_dir)
        valid = emb_io.valid_rows(x)
        pool = np.flatnonzero(valid)
        skipped = np.flatnonzero(~valid)
        sub = x if skipped.size == 0 else x[pool]
        log.info("dedup: %d images (%d unusable embeddings skipped)", len(pool), len(skipped))
        i, j, sims = find_duplicate_pairs(
            sub,
            k=d.k,
            threshold=d.threshold,
            index_cfg=cfg.index,
            batch_size=cfg.index.batch_size,
            progress=cfg.progress,
        )
        labels = components(len(pool), i, j)
        scores = _load_scores(d.score_file, workdir, len(x))[pool] if d.keep == "score" else None
        keep_local = select_keep(labels, d.keep, d.seed, pairs=(i, j), emb=sub, scores=scores)
        kept = pool[keep_local]
        check_removed_fraction("dedup", len(pool), len(kept), d.max_removed_fraction, force, f"threshold {d.threshold}")

        pairs = np.empty(len(i), dtype=PAIR_DTYPE)
        pairs["i"], pairs["j"], pairs["sim"] = pool[i], pool[j], sims
        global_labels = np.full(len(x), -1, dtype=np.int64)
        global_labels[pool] = labels
        save_npy(out / "pairs.npy", pairs)
        save_npy(out / "labels.npy", global_labels)
        save_npy(out / "kept.npy", kept)
        write_lines(out / "skipped.txt", (paths[r] for r in skipped))
        pool_paths = [paths[r] for r in pool]
        report = components_report(labels, keep_local, pool_paths, d.report_top, d.report_members)
        report = dedup_report(d, len(i), len(skipped), emb_dir, report)
        write_json(out / "components.json", report)
        return {**{k: v for k, v in report.items() if k != "largest_components"}, **funnel(len(pool), len(kept))}

    return run_stage(workdir, "dedup", fp, compute, force)


def dedup_settings(workdir: Path, cfg: CurationConfig) -> tuple[DedupConfig, str]:
    """``cfg.dedup`` checked, with its threshold resolved (``auto``: calibrate's), and the stage's
    fingerprint (shared with the sharded search of ``data_curation.slurm``)."""
    d = cfg.dedup
    if d.keep not in KEEP_RULES:
        raise CurationError(f"dedup.keep must be one of {', '.join(KEEP_RULES)}, got {d.keep!r}")
    if d.k < 1 or not 0 < d.max_removed_fraction <= 1:
        raise CurationError("dedup.k must be at least 1 and dedup.max_removed_fraction in (0, 1]")
    emb_fp = emb_io.embeddings_fingerprint(resolve_path(workdir, cfg.embeddings))
    d = replace(d, threshold=resolved_threshold(workdir, cfg, "dedup"))
    score_fp = file_fingerprint(_score_path(d.score_file, workdir)) if d.keep == "score" else ""
    return d, fingerprint("dedup", emb_fp, d, cfg.index, score_fp)


def _score_path(score_file: str, workdir: Path) -> Path:
    """The ``score`` rule's file (relative paths are relative to the work dir)."""
    if not score_file:
        raise ValueError("dedup.keep=score needs dedup.score_file (a .npy with one score per row)")
    return resolve_path(workdir, score_file)


def _load_scores(score_file: str, workdir: Path, n: int) -> np.ndarray:
    """The per-row scores of the ``score`` keep rule, checked against the row count."""
    path = _score_path(score_file, workdir)
    scores = np.load(path)
    if scores.shape != (n,):
        raise ValueError(f"{path}: expected shape ({n},), got {scores.shape}")
    return scores


def dedup_report(d, n_pairs: int, n_skipped: int, emb_dir, components: dict) -> dict:
    """The ``components.json`` body: the stage's settings and counts, then the components report."""
    return {
        "threshold": d.threshold,
        "k": d.k,
        "keep_rule": d.keep,
        "n_pairs": n_pairs,
        "n_skipped_embeddings": n_skipped,
        "n_skipped_inputs": emb_io.read_meta(emb_dir).get("num_skipped", 0),
        **components,
    }
