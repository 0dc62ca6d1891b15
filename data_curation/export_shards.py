"""The ``export-shards`` stage: the curated manifest's images → new shuffled tar shards.

    dinov2-curate export-shards --workdir runs/cur export_shards.samples_per_shard=10000
    dinov2-train --config train/vitl14 data.dataset.kind=shards \\
        data.dataset.path='runs/cur/export_shards/train-{000000..000013}.tar'

Reads ``manifest.csv`` (``export_shards.manifest``; by default the ``manifest`` stage's output) and
writes its images as shards of ``samples_per_shard`` samples in a seeded random order, each with
``.cls`` (the manifest's label, else the source shard's ``.cls``) and ``.json`` (original path,
source, and the source shard's metadata) — the layout and the resumable, atomic writing of
:mod:`data_curation.pack`, whose summary (with the ``data.dataset.path`` to train on) it returns. A
manifest row may name a file or a sample of a tar shard (``/data/train-000003.tar#key``, as the
embed stage writes rows of shard inputs), so a pool kept as shards is curated and exported without
ever being unpacked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_curation.config import CurationConfig
from data_curation.pack import PackInput, write_shard_set
from data_curation.workdir import resolve_path


def manifest_path(workdir: str | Path, cfg: CurationConfig) -> Path:
    """``export_shards.manifest``, else where the ``manifest`` stage writes."""
    if cfg.export_shards.manifest:
        return resolve_path(workdir, cfg.export_shards.manifest)
    if cfg.manifest.output:
        return resolve_path(workdir, cfg.manifest.output)
    return Path(workdir) / "manifest" / "manifest.csv"


def run_export_shards(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``export-shards`` stage (see the module docstring); returns the summary."""
    cfg = cfg or CurationConfig()
    e = cfg.export_shards
    manifest = manifest_path(workdir, cfg)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: run the manifest stage first, or set export_shards.manifest")
    out = resolve_path(workdir, e.output)
    return write_shard_set(
        PackInput("manifest", str(manifest.resolve()), key="export_shards.manifest"),
        out,
        e,
        force=force,
        progress=cfg.progress,
        section="export_shards",
    )
