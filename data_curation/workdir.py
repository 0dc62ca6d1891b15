"""The curation work directory: stage folders, DONE markers, and which selection feeds a stage.

Layout (every stage owns one folder; all row indices are global rows of the embeddings)::

    <workdir>/embeddings/      the embedding format (see data_curation.embeddings)
    <workdir>/dedup/           kept.npy, labels.npy, pairs.npy, components.json, skipped.txt, DONE
    <workdir>/decontaminate/   kept.npy, flagged.npy, report.json, DONE
    <workdir>/retrieve/        selected.npy, report.json, (pool k-means files), DONE
    <workdir>/cluster/         pool.npy, level{l}_centroids.npy, level{l}_assign.npy, ..., DONE
    <workdir>/sample/          selected.npy, report.json, DONE
    <workdir>/manifest/        manifest.csv, DONE

Idempotency: a stage's ``DONE`` file holds a fingerprint of its configuration and of its inputs'
fingerprints. A re-run whose fingerprint matches returns the stored summary without recomputing;
a changed config or a recomputed input changes the fingerprint, so the stage (and, through the
chain of fingerprints, every later stage) recomputes. ``force=True`` always recomputes. ``DONE``
is removed before a stage starts and written last, so an interrupted stage is simply re-run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from data_curation.atomic import write_json
from data_curation.errors import CurationError

log = logging.getLogger(__name__)

#: The file holding each stage's selected global row indices (sorted int64).
SELECTION_FILES = MappingProxyType(
    {
        "dedup": "dedup/kept.npy",
        "decontaminate": "decontaminate/kept.npy",
        "retrieve": "retrieve/selected.npy",
        "sample": "sample/selected.npy",
    }
)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able values (dataclasses are converted to dicts)."""

    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"cannot fingerprint {type(obj).__name__}")

    blob = json.dumps(parts, sort_keys=True, default=default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    """A short hash of a file's bytes (for inputs such as score files and selections)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def resolve_path(workdir: str | Path, path: str | Path) -> Path:
    """``path`` as given when absolute, else relative to the work dir."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(workdir) / path


def stage_dir(workdir: str | Path, name: str) -> Path:
    """The folder of stage ``name`` (created)."""
    path = Path(workdir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_done(workdir: str | Path, name: str) -> dict[str, Any] | None:
    """The DONE record of a stage (fingerprint, summary, ...), or None if it has not finished."""
    done = Path(workdir) / name / "DONE"
    if not done.is_file():
        return None
    return json.loads(done.read_text())


def funnel(n_in: int, n_out: int) -> dict[str, Any]:
    """The images a stage received and passed on, and the fraction it removed: every stage's summary
    holds these three keys (``dinov2-curate report`` draws them as the stage funnel)."""
    return {
        "images_in": int(n_in),
        "images_out": int(n_out),
        "removed_fraction": round((n_in - n_out) / n_in, 6) if n_in else 0.0,
    }


def funnel_line(name: str, summary: dict[str, Any]) -> str | None:
    """``"dedup: 340 images in, 338 out (0.6 % removed)"``, or None when the summary has no funnel."""
    if "images_in" not in summary:
        return None
    n_in, n_out = summary["images_in"], summary["images_out"]
    return f"{name}: {n_in:,} images in, {n_out:,} out ({100 * summary['removed_fraction']:.1f} % removed)"


def check_removed_fraction(stage: str, n_in: int, n_out: int, limit: float, force: bool, what: str) -> None:
    """The guardrail of the removing stages: more than ``limit`` of the images removed stops the stage
    (before it writes anything) unless ``force``. ``what`` names the rule, e.g. "threshold 0.6"."""
    removed = n_in - n_out
    if n_in and removed > limit * n_in and not force:
        raise CurationError(
            f"{stage} would remove {removed:,} of {n_in:,} images ({100 * removed / n_in:.1f} %) at {what}, more than "
            f"{stage}.max_removed_fraction={limit}; the threshold is probably wrong for this embedding: run "
            f"`dinov2-curate calibrate` (or set {stage}.threshold=auto), or pass --force to accept"
        )
    if n_in and removed > limit * n_in:
        log.warning("%s: removing %.1f %% of the images (--force)", stage, 100 * removed / n_in)


def run_stage(
    workdir: str | Path,
    name: str,
    fp: str,
    compute: Callable[[Path], dict[str, Any]],
    force: bool = False,
) -> dict[str, Any]:
    """Run ``compute(stage_folder) -> summary`` unless the stage is done with fingerprint ``fp``.

    Returns the summary (the stored one when skipped). The summary must be JSON-able; its funnel
    (:func:`funnel`), when it has one, is logged. A :class:`CurationError` from ``compute`` (raised
    before it writes anything) puts back the stage's previous ``DONE`` record, so a refused re-run
    leaves the work directory as it was.
    """
    done = read_done(workdir, name)
    if done is not None and done.get("fingerprint") == fp and not force:
        log.info("%s: already done (fingerprint %s), skipping; use --force to recompute", name, fp)
        return done["summary"]
    if done is not None and not force:
        log.info("%s: configuration or inputs changed, recomputing", name)
    folder = stage_dir(workdir, name)
    (folder / "DONE").unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        summary = compute(folder)
    except CurationError:
        if done is not None:
            write_json(folder / "DONE", done)
        raise
    seconds = round(time.perf_counter() - t0, 3)
    write_json(folder / "DONE", {"fingerprint": fp, "seconds": seconds, "summary": summary})
    line = funnel_line(name, summary)
    log.info("%s (%.1f s)", line, seconds) if line else log.info("%s: done in %.1f s", name, seconds)
    return summary


class Selection(NamedTuple):
    """Which rows a stage works on: ``name`` is "all", a stage name, or a ``.npy`` path."""

    name: str
    fingerprint: str  # changes whenever the selected rows may have changed


def resolve_selection(workdir: str | Path, source: str, auto_order: Sequence[str], embeddings_fp: str) -> Selection:
    """Resolve a stage's ``input`` setting without reading any data.

    ``source`` is ``"auto"`` (the first finished stage of ``auto_order``, else ``"all"``),
    ``"all"`` (every usable row), a stage name from :data:`SELECTION_FILES`, or a path to a
    ``.npy`` of global row indices (relative paths from the work dir).
    """
    if source == "auto":
        source = next((s for s in auto_order if read_done(workdir, s) is not None), "all")
        log.info("input selection: %s", source)
    if source == "all":
        return Selection("all", embeddings_fp)
    if source in SELECTION_FILES:
        done = read_done(workdir, source)
        if done is None:
            raise FileNotFoundError(f"stage '{source}' has not finished in {workdir}; run it first")
        return Selection(source, done["fingerprint"])
    path = resolve_path(workdir, source)
    if path.suffix == ".npy" and path.is_file():
        return Selection(str(path), file_fingerprint(path))
    raise ValueError(f"unknown selection '{source}': use auto, all, one of {sorted(SELECTION_FILES)}, or a .npy path")


def load_selection(workdir: str | Path, selection: Selection, valid: np.ndarray) -> np.ndarray:
    """Sorted unique int64 global rows of ``selection``; ``valid`` is the usable-row mask."""
    if selection.name == "all":
        return np.flatnonzero(valid).astype(np.int64)
    file = Path(workdir) / SELECTION_FILES[selection.name] if selection.name in SELECTION_FILES else None
    indices = np.unique(np.load(file or selection.name).astype(np.int64))
    if indices.size and (indices[0] < 0 or indices[-1] >= len(valid)):
        raise ValueError(f"selection {selection.name}: row indices outside [0, {len(valid)})")
    return indices
