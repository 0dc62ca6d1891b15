"""The manifest: the final list of images that ``dinov2-train`` reads.

A CSV file (RFC 4180 quoting, UTF-8) with the header ``path,source,label`` and one row per image:
``path`` is the image file (or id), ``source`` names where it came from (a data source or the
curation stage that selected it), ``label`` is optional and empty when unknown. A manifest with
only the ``path,source`` columns is read as well.

Stage outputs (``<workdir>/manifest/``): ``manifest.csv`` (or ``manifest.output``), ``DONE``.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_curation import embeddings as emb_io
from data_curation.atomic import open_text_atomic, read_lines
from data_curation.config import CurationConfig
from data_curation.errors import CurationError
from data_curation.workdir import (
    file_fingerprint,
    fingerprint,
    funnel,
    load_selection,
    resolve_path,
    resolve_selection,
    run_stage,
)

log = logging.getLogger(__name__)

HEADER = ("path", "source", "label")
ManifestRow = tuple[str, str, str | None]


def write_manifest(path: str | Path, rows: Iterable[Sequence[Any]]) -> int:
    """Write ``(path, source[, label])`` rows atomically; returns the number of rows.

    A missing or None label is written as an empty field.
    """
    n = 0
    with open_text_atomic(path, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        for row in rows:
            if len(row) not in (2, 3):
                raise ValueError(f"manifest rows are (path, source[, label]), got {row!r}")
            label = row[2] if len(row) == 3 and row[2] is not None else ""
            writer.writerow((str(row[0]), str(row[1]), str(label)))
            n += 1
    return n


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """The rows of a manifest as ``(path, source, label or None)``."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = tuple(next(reader, ()))
        if header not in (HEADER, HEADER[:2]):
            raise ValueError(f"{path}: header must be 'path,source,label', got {','.join(header)!r}")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ValueError(f"{path}:{line_no}: expected {len(header)} fields, got {len(row)}")
            label = row[2] if len(row) == 3 and row[2] != "" else None
            rows.append((row[0], row[1], label))
    return rows


def load_labels(path: Path, n: int) -> list[str]:
    """One label per embedding row from a ``.npy`` array or a text file (one label per line)."""
    labels = [str(v) for v in np.load(path).tolist()] if path.suffix == ".npy" else read_lines(path)
    if len(labels) != n:
        raise ValueError(f"{path}: {len(labels)} labels for {n} embedding rows")
    return labels


def run_manifest(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``manifest`` stage: map the selected rows (``manifest.selection``) to a manifest.

    ``selection=auto`` takes the first finished stage of sample, retrieve, decontaminate, dedup
    (else every usable row); a ``.npy`` path of global row indices works too. Relative paths in
    ``paths.txt`` are joined to the embeddings' ``root`` when meta.json has one.
    """
    cfg = cfg or CurationConfig()
    workdir = Path(workdir)
    m = cfg.manifest
    emb_dir = resolve_path(workdir, cfg.embeddings)
    selection = resolve_selection(
        workdir, m.selection, ("sample", "retrieve", "decontaminate", "dedup"), emb_io.embeddings_fingerprint(emb_dir)
    )
    output = resolve_path(workdir, m.output) if m.output else workdir / "manifest" / "manifest.csv"
    labels_fp = file_fingerprint(resolve_path(workdir, m.labels)) if m.labels else ""
    fp = fingerprint("manifest", selection, emb_io.embeddings_fingerprint(emb_dir), m, str(output), labels_fp)

    def compute(out: Path) -> dict[str, Any]:
        meta = emb_io.read_meta(emb_dir)
        paths = emb_io.read_paths(emb_dir)
        if selection.name == "all":
            x, _ = emb_io.load_embeddings(emb_dir)
            valid = emb_io.valid_rows(x)
        else:
            valid = np.ones(meta["count"], dtype=bool)
        rows = load_selection(workdir, selection, valid)
        if len(rows) == 0:
            raise CurationError(f"manifest: the selection '{selection.name}' is empty: nothing to train on")
        root = meta.get("root", "")
        source = m.source or meta.get("source", "") or Path(selection.name).stem
        labels = load_labels(resolve_path(workdir, m.labels), meta["count"]) if m.labels else None
        n = write_manifest(
            output,
            ((os.path.join(root, paths[r]) if root else paths[r], source, labels[r] if labels else None) for r in rows),
        )
        log.info("manifest: %d rows from selection '%s' -> %s", n, selection.name, output)
        return {
            "selection": selection.name,
            "n_rows": n,
            "output": str(output),
            "source": source,
            **funnel(len(rows), n),
        }

    return run_stage(workdir, "manifest", fp, compute, force)
