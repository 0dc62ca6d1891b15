"""Decontamination: remove from the pool everything that resembles an evaluation image.

Every usable pool image (all members of the dedup components, not only the kept ones, so a
near-copy of an evaluation image cannot hide behind a dissimilar representative) is searched
against an index of each evaluation set for its single nearest evaluation image. An image is
*flagged* when that cosine similarity is strictly above ``threshold``; the whole dedup component of
every flagged image is then dropped from the kept list. Without a finished dedup stage every image
is its own component.

Searching the pool against the (small) evaluation index with k = 1 is exact for this rule ("similar
to any evaluation image") and keeps memory bounded by one batch.

``threshold=auto`` (the default) takes the one ``calibrate`` picks from planted copies of evaluation
images. Guardrail: dropping more than ``decontaminate.max_removed_fraction`` of the kept images stops
the stage before it writes anything, unless ``--force``.

Stage outputs (``<workdir>/decontaminate/``): ``kept.npy`` (sorted global rows), ``flagged.npy``
(structured: row, eval_set, eval_row, sim — the best match per flagged pool image), ``report.json``
(counts per evaluation set, the most similar examples), ``DONE``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from data_curation import embeddings as emb_io
from data_curation.atomic import save_npy, write_json
from data_curation.calibrate import resolved_threshold
from data_curation.config import CurationConfig, IndexConfig
from data_curation.errors import CurationError
from data_curation.index import index_from_config, iter_search
from data_curation.workdir import check_removed_fraction, fingerprint, funnel, read_done, resolve_path, run_stage

log = logging.getLogger(__name__)

FLAG_DTYPE = np.dtype([("row", np.int64), ("eval_set", np.int32), ("eval_row", np.int64), ("sim", np.float32)])


def nearest_eval_similarity(
    pool: np.ndarray,
    eval_emb: np.ndarray,
    index_cfg: IndexConfig | None = None,
    batch_size: int = 16384,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """For each pool row: (cosine similarity to its nearest evaluation row, that row's index)."""
    index = index_from_config(eval_emb, index_cfg or IndexConfig())
    best = np.full(len(pool), -np.inf, dtype=np.float32)
    nearest = np.full(len(pool), -1, dtype=np.int64)
    for start, sims, ids in iter_search(index, pool, 1, batch_size=batch_size, progress=progress):
        best[start : start + len(sims)] = sims[:, 0]
        nearest[start : start + len(ids)] = ids[:, 0]
    return best, nearest


def drop_flagged_components(kept: np.ndarray, labels: np.ndarray, flagged_rows: np.ndarray) -> np.ndarray:
    """``kept`` without the members of any component holding a flagged row (labels: global rows)."""
    bad_components = np.unique(labels[flagged_rows])
    return kept[~np.isin(labels[kept], bad_components)]


def run_decontaminate(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``decontaminate`` stage (see the module docstring); needs ``decontaminate.eval_sets``."""
    cfg = cfg or CurationConfig()
    workdir = Path(workdir)
    c = cfg.decontaminate
    if not c.eval_sets:
        raise CurationError("decontaminate.eval_sets is empty: give the embedding dirs of the evaluation sets")
    emb_dir = resolve_path(workdir, cfg.embeddings)
    eval_dirs = [resolve_path(workdir, p) for p in c.eval_sets]
    pool_dim = emb_io.read_meta(emb_dir)["dim"]
    for eval_dir in eval_dirs:
        emb_io.check_dim(eval_dir, pool_dim, str(eval_dir))
    c = replace(c, threshold=resolved_threshold(workdir, cfg, "decontaminate"))
    dedup_done = read_done(workdir, "dedup")
    fp = fingerprint(
        "decontaminate",
        emb_io.embeddings_fingerprint(emb_dir),
        dedup_done["fingerprint"] if dedup_done else None,
        [emb_io.embeddings_fingerprint(p) for p in eval_dirs],
        c,
        cfg.index,
    )

    def compute(out: Path) -> dict[str, Any]:
        x, paths = emb_io.load_embeddings(emb_dir)
        if dedup_done:
            labels = np.load(workdir / "dedup" / "labels.npy")
            kept = np.load(workdir / "dedup" / "kept.npy")
        else:
            log.warning("decontaminate: dedup has not run; every image is its own component")
            valid = emb_io.valid_rows(x)
            labels = np.where(valid, np.arange(len(x)), -1)
            kept = np.flatnonzero(valid)
        pool = np.flatnonzero(labels >= 0)
        pool_x = x if len(pool) == len(x) else x[pool]
        best = np.full(len(pool), -np.inf, dtype=np.float32)
        best_set = np.full(len(pool), -1, dtype=np.int32)
        best_row = np.full(len(pool), -1, dtype=np.int64)
        per_set = []
        for s, eval_dir in enumerate(eval_dirs):
            eval_x, _ = emb_io.load_embeddings(eval_dir)
            sims, nearest = nearest_eval_similarity(pool_x, eval_x, cfg.index, cfg.index.batch_size, cfg.progress)
            n_flagged = int((sims > c.threshold).sum())
            per_set.append({"path": str(eval_dir), "n_eval": len(eval_x), "n_flagged": n_flagged})
            better = sims > best
            best[better], best_set[better], best_row[better] = sims[better], s, nearest[better]
        hit = best > c.threshold
        flagged = np.empty(int(hit.sum()), dtype=FLAG_DTYPE)
        flagged["row"], flagged["eval_set"] = pool[hit], best_set[hit]
        flagged["eval_row"], flagged["sim"] = best_row[hit], best[hit]
        new_kept = drop_flagged_components(kept, labels, flagged["row"])
        check_removed_fraction(
            "decontaminate", len(kept), len(new_kept), c.max_removed_fraction, force, f"threshold {c.threshold}"
        )
        save_npy(out / "flagged.npy", flagged)
        save_npy(out / "kept.npy", new_kept)
        summary = {
            "threshold": c.threshold,
            "n_searched": len(pool),
            "n_flagged": len(flagged),
            "n_components_dropped": len(np.unique(labels[flagged["row"]])),
            "n_kept_before": len(kept),
            "n_kept": len(new_kept),
            "eval_sets": per_set,
            **funnel(len(kept), len(new_kept)),
        }
        eval_paths = [emb_io.read_paths(p) for p in eval_dirs] if c.report_top else []
        examples = [
            {"pool": paths[f["row"]], "eval": eval_paths[f["eval_set"]][f["eval_row"]], "sim": float(f["sim"])}
            for f in np.sort(flagged, order="sim")[::-1][: c.report_top]
        ]
        write_json(out / "report.json", {**summary, "examples": examples})
        return summary

    return run_stage(workdir, "decontaminate", fp, compute, force)
