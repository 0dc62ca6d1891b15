"""``report``: what a person checks before spending a GPU-month on the curated list.

Reads the work directory (nothing is recomputed) and writes ``<workdir>/report/``:

* ``report.md`` — the stage funnel (images in / out / removed per stage), the dedup and calibration
  settings, the duplicate-group and cluster-size tables, links to the pictures;
* ``funnel.png`` — images remaining after each stage;
* ``dedup_groups.png`` — how many duplicate groups there are of each size (log scale);
* ``largest_groups.png`` — contact sheet of the largest duplicate groups (one row each, the kept image first);
* ``threshold_pairs.png`` — pairs just above the dedup threshold (removed as copies) and just below it
  (kept as different images): where the threshold's mistakes are, if any;
* ``cluster_sizes.png`` — points per level-1 cluster (sorted), when the cluster stage ran.

The contact sheets read the images through the embed stage's settings (``data_curation.images``);
when they cannot be opened the report says so and leaves the sheets out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from data_curation import embeddings as emb_io
from data_curation.atomic import write_text
from data_curation.calibrate import headline
from data_curation.config import CurationConfig
from data_curation.errors import CurationError
from data_curation.images import RowImages
from data_curation.index import index_from_config, search
from data_curation.plots import bar_chart, contact_sheet
from data_curation.workdir import fingerprint, read_done, resolve_path, run_stage

log = logging.getLogger(__name__)

FUNNEL_STAGES = ("embed", "dedup", "decontaminate", "retrieve", "cluster", "sample", "manifest")
N_GROUPS, GROUP_MEMBERS, N_PAIRS = 8, 10, 8


def stage_funnel(workdir: Path, emb_dir: Path) -> list[dict[str, Any]]:
    """``[{stage, images_in, images_out, removed_fraction}]`` for the stages that have run, in pipeline order."""
    rows = []
    for name in FUNNEL_STAGES:
        if name == "embed":
            if (emb_dir / "meta.json").is_file():
                meta = emb_io.read_meta(emb_dir)
                n_in, n_out = meta["count"] + meta["num_skipped"], meta["count"]
                rows.append(
                    {
                        "stage": name,
                        "images_in": n_in,
                        "images_out": n_out,
                        "removed_fraction": 1 - n_out / max(n_in, 1),
                    }
                )
            continue
        done = read_done(workdir, name)
        if done is not None and "images_in" in done["summary"]:
            summary = done["summary"]
            rows.append({"stage": name, **{k: summary[k] for k in ("images_in", "images_out", "removed_fraction")}})
    return rows


def group_sizes(labels: np.ndarray) -> np.ndarray:
    """Size of every duplicate group (component) of the dedup labels (-1: unusable rows, ignored)."""
    labels = labels[labels >= 0]
    return np.bincount(labels) if labels.size else np.zeros(0, np.int64)


def pairs_near_threshold(
    x: np.ndarray, pool: np.ndarray, pairs: np.ndarray, threshold: float, cfg: CurationConfig, n: int = N_PAIRS
) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """(the ``n`` dedup pairs with the lowest similarity above ``threshold``, the ``n`` nearest-neighbour
    pairs with the highest similarity at or below it), as global (row, row, cosine)."""
    above = np.sort(pairs, order="sim")[:n]
    above_list = [(int(p["i"]), int(p["j"]), float(p["sim"])) for p in above]
    rng = np.random.default_rng(0)
    queries = pool if len(pool) <= 5000 else np.sort(rng.choice(pool, 5000, replace=False))
    index = index_from_config(x[pool], cfg.index)
    sims, ids = search(index, x[queries], min(len(pool), 9), batch_size=cfg.index.batch_size)
    found: dict[tuple[int, int], float] = {}
    for q, row_sims, row_ids in zip(queries, sims, ids):
        for s, j in zip(row_sims, row_ids):
            other = int(pool[j]) if j >= 0 else -1
            if other >= 0 and other != q and s <= threshold:
                found[(min(q, other), max(q, other))] = float(s)
    below = sorted(found.items(), key=lambda item: -item[1])[:n]
    return above_list, [(int(a), int(b), s) for (a, b), s in below]


def run_report(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``report`` stage (see the module docstring)."""
    cfg = cfg or CurationConfig()
    workdir = Path(workdir)
    emb_dir = resolve_path(workdir, cfg.embeddings)
    if not (emb_dir / "meta.json").is_file():
        raise CurationError(f"report: no finished embeddings in {emb_dir}; run the embed stage first")
    done = {name: read_done(workdir, name) for name in (*FUNNEL_STAGES, "calibrate")}
    fp = fingerprint(
        "report", emb_io.embeddings_fingerprint(emb_dir), {k: v and v["fingerprint"] for k, v in done.items()}
    )

    def compute(out: Path) -> dict[str, Any]:
        return write_report(workdir, cfg, emb_dir, out, done)

    return run_stage(workdir, "report", fp, compute, force)


def write_report(workdir: Path, cfg: CurationConfig, emb_dir: Path, out: Path, done: dict[str, Any]) -> dict[str, Any]:
    lines = [f"# Curation report: `{workdir}`", ""]
    pictures: list[str] = []
    funnel = stage_funnel(workdir, emb_dir)
    lines += ["## Stage funnel", "", "| stage | images in | images out | removed |", "|---|---:|---:|---:|"]
    for row in funnel:
        lines.append(
            f"| {row['stage']} | {row['images_in']:,} | {row['images_out']:,} | {100 * row['removed_fraction']:.1f} % |"
        )
    if funnel and bar_chart(
        out / "funnel.png",
        [r["stage"] for r in funnel],
        [r["images_out"] for r in funnel],
        "images after each stage",
        "images",
        annotations=[f"{r['images_out']:,}" for r in funnel],
    ):
        pictures.append("funnel.png")
        lines += ["", "![funnel](funnel.png)"]
    lines.append("")

    calibrate = done.get("calibrate")
    if calibrate is not None:
        lines += ["## Calibration", ""]
        for name, part in calibrate["summary"].items():
            if part is not None:
                lines.append(f"- {headline(name, part)}")
        lines += ["", "Details: `calibrate/report.md`, `calibrate/similarities.png`.", ""]

    images = _row_images(emb_dir)
    if images is None:
        lines += ["_The images behind the embeddings could not be opened: no contact sheets._", ""]
    summary: dict[str, Any] = {"stages": [r["stage"] for r in funnel]}
    dedup = done.get("dedup")
    if dedup is not None:
        labels = np.load(workdir / "dedup" / "labels.npy")
        kept = np.load(workdir / "dedup" / "kept.npy")
        sizes = group_sizes(labels)
        threshold = float(dedup["summary"]["threshold"])
        counts = np.bincount(sizes)[1:] if sizes.size else np.zeros(0, np.int64)
        lines += [
            f"## Duplicate groups (dedup threshold {threshold:.3f})",
            "",
            "| group size | groups | images |",
            "|---:|---:|---:|",
        ]
        for size in np.flatnonzero(counts) + 1:
            lines.append(f"| {size} | {counts[size - 1]:,} | {size * counts[size - 1]:,} |")
        bucket = dedup["summary"].get("size_histogram", {})
        if bucket and bar_chart(
            out / "dedup_groups.png",
            list(bucket),
            list(bucket.values()),
            "duplicate groups by size",
            "groups",
            log_scale=True,
            annotations=[f"{v:,}" for v in bucket.values()],
        ):
            pictures.append("dedup_groups.png")
            lines += ["", "![group sizes](dedup_groups.png)"]
        lines.append("")
        summary.update({"n_groups": int(len(sizes)), "largest_group": int(sizes.max()) if sizes.size else 0})
        if images is not None:
            largest = np.argsort(-sizes, kind="stable")[:N_GROUPS]
            largest = largest[sizes[largest] > 1]
            rows = []
            for group in largest:
                members = np.flatnonzero(labels == group)
                first = members[np.isin(members, kept)]
                ordered = np.r_[first, members[~np.isin(members, kept)]][:GROUP_MEMBERS]
                rows.append(
                    (
                        f"group of {sizes[group]}\nkept first\n{_short(images.describe(int(ordered[0])))}",
                        [images.load(int(r)) for r in ordered],
                    )
                )
            if rows:
                contact_sheet(out / "largest_groups.png", rows)
                pictures.append("largest_groups.png")
                lines += ["## Largest duplicate groups", "", "![largest groups](largest_groups.png)", ""]
            x, _ = emb_io.load_embeddings(emb_dir)
            pool = np.flatnonzero(labels >= 0)
            above, below = pairs_near_threshold(x, pool, np.load(workdir / "dedup" / "pairs.npy"), threshold, cfg)
            rows = _pair_rows(images, above, "removed: just above") + _pair_rows(images, below, "kept: just below")
            if rows:
                contact_sheet(out / "threshold_pairs.png", rows)
                pictures.append("threshold_pairs.png")
                lines += [
                    "## Pairs at the threshold",
                    "",
                    f"The {len(above)} least similar pairs above {threshold:.3f} (treated as copies) and the "
                    f"{len(below)} most similar nearest-neighbour pairs at or below it (kept as different images):",
                    "",
                    "![pairs at the threshold](threshold_pairs.png)",
                    "",
                ]
    if done.get("cluster") is not None:
        assign = np.load(workdir / "cluster" / "level1_assign.npy")
        k = len(np.load(workdir / "cluster" / "level1_centroids.npy"))
        sizes = np.sort(np.bincount(assign, minlength=k))[::-1]
        lines += [
            "## Clusters (level 1)",
            "",
            f"{k:,} clusters of {len(assign):,} images: largest {sizes[0]:,}, median {int(np.median(sizes)):,}, "
            f"smallest {sizes[-1]:,}, empty {int((sizes == 0).sum()):,}.",
            "",
        ]
        shown = sizes if k <= 200 else sizes[np.linspace(0, k - 1, 200).round().astype(int)]
        if bar_chart(
            out / "cluster_sizes.png",
            [""] * len(shown),
            shown.tolist(),
            f"points per level-1 cluster ({k:,}, sorted)",
            "images",
        ):
            pictures.append("cluster_sizes.png")
            lines += ["![cluster sizes](cluster_sizes.png)", ""]
        summary["n_clusters"] = k
    write_text(out / "report.md", "\n".join(lines) + "\n")
    log.info("report: %s", out / "report.md")
    return {**summary, "report": str(out / "report.md"), "pictures": pictures}


def _pair_rows(images: Any, pairs: list[tuple[int, int, float]], what: str, per_row: int = 4) -> list:
    """Contact-sheet rows of ``per_row`` pairs each, captioned with ``what`` and their cosines."""
    rows = []
    for start in range(0, len(pairs), per_row):
        chunk = pairs[start : start + per_row]
        caption = f"{what}\nthe threshold\ncos " + " ".join(f"{s:.3f}" for _, _, s in chunk)
        rows.append((caption, [images.load(r) for a, b, _ in chunk for r in (a, b)]))
    return rows


def _row_images(emb_dir: Path) -> Any:
    try:
        return RowImages(emb_dir)
    except (CurationError, OSError, ValueError) as e:
        log.warning("report: no contact sheets (%s)", e)
        return None


def _short(path: str, width: int = 34) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]
