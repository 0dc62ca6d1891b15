"""The ``pack`` stage: images (a folder, a file list, a manifest or other shards) → tar shards.

    dinov2-curate pack --workdir runs/pack pack.path=/data/images pack.output=/data/shards \\
        pack.samples_per_shard=10000

writes ``/data/shards/train-000000.tar``, ``train-000001.tar``, ... in the webdataset layout, each
with its offset index beside it, and prints the ``data.dataset.path`` that reads them
(``/data/shards/train-{000000..000041}.tar``). Every sample holds the encoded image as it was (a
format other than JPEG/PNG/WebP is re-encoded as PNG), ``.cls`` with the integer label when one is
known (sub-folder, list or manifest label, or the source shard's ``.cls``) and ``.json`` with the
original path (plus its class name, manifest source, and the source shard's own metadata under
``meta``). Samples are shuffled across shards (``pack.shuffle``, seeded), so that a shuffle window
of a few shards already mixes the classes.

Resumable at shard granularity: the plan (``.pack/plan.json``: a fingerprint of every input path
and label and of the settings) fixes which samples go into which shard; each shard is written under
a temporary name and renamed when complete (:class:`dinov2.data.shard_writer.ShardWriter`), so a
re-run after an interruption writes only the missing shards. A re-run with another plan refuses to
mix shard sets unless ``--force`` (which deletes the files of the old plan). ``pack.json`` (the
summary) is written last.

With ``pack.verify`` each image is decoded before it is written; one that cannot be decoded is left
out, logged once and listed in ``skipped.txt``, so a shard may hold fewer samples than planned.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from data_curation.atomic import read_lines, write_json, write_lines
from data_curation.config import CurationConfig, ShardSetConfig
from data_curation.workdir import fingerprint, resolve_path
from dinov2.config import DatasetConfig

log = logging.getLogger(__name__)

INPUT_KINDS = ("folder", "filelist", "manifest", "shards")
PLAN_DIR = ".pack"
SUMMARY_FILE = "pack.json"
READ_AHEAD = 16  # images read ahead per thread


# ------------------------------------------------------------------------------------------- input
@dataclass(frozen=True)
class PackItem:
    """One image to pack: a file or a shard sample (``{shard}.tar#{key}``), its label (-1: unknown)
    and the metadata written to its ``.json``."""

    path: str
    label: int
    meta: dict[str, Any]


class PackInput:
    """The images of a dataset, as :class:`PackItem` on demand (nothing per image held in Python objects)."""

    def __init__(self, kind: str, path: str, key: str = "pack.path"):
        from dinov2.data import build_dataset  # lazy: torch (~2 s); curation modules import without it
        from dinov2.data.shards import expand_shard_paths

        if kind not in INPUT_KINDS:
            raise ValueError(f"pack input kind must be one of {', '.join(INPUT_KINDS)}, got {kind!r}")
        if not path:
            raise ValueError(f"no images given: set {key} (a folder, file list, manifest or shards)")
        if kind == "shards":
            expand_shard_paths(path, key=key)  # each shard exists (a pattern is no path)
        elif not os.path.exists(path):
            raise FileNotFoundError(f"{key}={path!r} does not exist")
        self.kind = kind
        self.dataset = build_dataset(DatasetConfig(kind=kind, path=path))
        self.classes: list[str] = list(getattr(self.dataset, "classes", []) or [])
        self.sources: list[str] | None = getattr(self.dataset, "sources", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, i: int) -> PackItem:
        ds = self.dataset
        path = ds.describe(i) if self.kind == "shards" else ds.path(i)
        label = ds.label(i)
        meta: dict[str, Any] = {"path": path}
        if 0 <= label < len(self.classes):
            meta["class"] = self.classes[label]
        if self.sources is not None and self.sources[i]:
            meta["source"] = self.sources[i]
        return PackItem(path, label, meta)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for i in range(len(self)):
            item = self.item(i)
            digest.update(json.dumps([item.path, item.label, item.meta], sort_keys=True).encode() + b"\n")
        return digest.hexdigest()[:16]


def read_item(item: PackItem, verify: bool) -> tuple[bytes, str, int, dict[str, Any]]:
    """``(encoded image, extension, label, metadata)`` of ``item``; raises when it cannot be read
    (or, with ``verify``, decoded)."""
    from dinov2.data.decode import decode_image  # lazy: torch (~2 s); curation modules import without it
    from dinov2.data.shard_index import IMAGE_EXTS
    from dinov2.data.shards import read_member, split_member_path

    meta = dict(item.meta)
    label = item.label
    if split_member_path(item.path) is not None:
        data, ext, shard_label, shard_meta = read_member(item.path)
        label = label if label >= 0 else shard_label
        if shard_meta is not None:
            try:
                meta["meta"] = json.loads(shard_meta)
            except (UnicodeDecodeError, ValueError):
                meta["meta"] = shard_meta.decode("utf-8", "replace")
    else:
        with open(item.path, "rb") as f:
            data = f.read()
        ext = os.path.splitext(item.path)[1].lower().lstrip(".")
    if verify or ext not in IMAGE_EXTS:
        image = decode_image(io.BytesIO(data))
        if ext not in IMAGE_EXTS:  # e.g. .bmp, .tif: stored losslessly in a format every reader knows
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data, ext = buffer.getvalue(), "png"
    return data, ext, label, meta


# ------------------------------------------------------------------------------------------ output
def check_shard_set(settings: ShardSetConfig, section: str) -> None:
    """``settings`` (a ``pack`` or ``export_shards`` section) name a valid shard set."""
    if settings.samples_per_shard < 1:
        raise ValueError(f"{section}.samples_per_shard must be >= 1, got {settings.samples_per_shard}")
    if not settings.name or "/" in settings.name or settings.name.startswith("."):
        raise ValueError(f"{section}.name must be a plain file name prefix, got {settings.name!r}")


def _width(count: int) -> int:
    return max(6, len(str(max(count - 1, 0))))


def shard_names(settings: ShardSetConfig, num_shards: int) -> list[str]:
    width = _width(num_shards)
    return [f"{settings.name}-{s:0{width}d}.tar" for s in range(num_shards)]


def dataset_path(out: Path, settings: ShardSetConfig, num_shards: int) -> str:
    """The ``data.dataset.path`` (a brace pattern) that names every shard of the set."""
    width = _width(num_shards)
    if num_shards == 1:
        return str(out / f"{settings.name}-{0:0{width}d}.tar")
    return str(out / f"{settings.name}-{{{0:0{width}d}..{num_shards - 1:0{width}d}}}.tar")


def _remove_plan_files(out: Path, plan: dict[str, Any]) -> None:
    """Delete the shards (and their indexes and receipts) an earlier plan wrote — nothing else."""
    from dinov2.data.shard_index import INDEX_SUFFIX  # lazy: torch (~2 s); curation modules import without it

    for name in plan.get("shards", []):
        (out / name).unlink(missing_ok=True)
        (out / (name + INDEX_SUFFIX)).unlink(missing_ok=True)
    for s in range(len(plan.get("shards", []))):
        (out / PLAN_DIR / f"{s:06d}.json").unlink(missing_ok=True)
    for name in (SUMMARY_FILE, "skipped.txt"):
        (out / name).unlink(missing_ok=True)


def write_shard_set(
    source: PackInput,
    out: Path,
    settings: ShardSetConfig,
    *,
    force: bool = False,
    progress: bool = True,
    section: str = "pack",
) -> dict[str, Any]:
    """Write ``source`` as shards into ``out`` (see the module docstring); returns the summary."""
    from dinov2.data.shard_writer import ShardWriter  # lazy: torch (~2 s); curation modules import without it

    check_shard_set(settings, section)
    n = len(source)
    num_shards = max(1, -(-n // settings.samples_per_shard))
    names = shard_names(settings, num_shards)
    plan = {
        "fingerprint": fingerprint(
            section,
            source.fingerprint(),
            settings.name,
            settings.samples_per_shard,
            settings.shuffle,
            settings.seed,
            settings.verify,
        ),
        "count": n,
        "samples_per_shard": settings.samples_per_shard,
        "shards": names,
    }
    plan_file = out / PLAN_DIR / "plan.json"
    old = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    if old is not None and old.get("fingerprint") != plan["fingerprint"]:
        if not force:
            raise RuntimeError(
                f"{out} holds shards of another {section} plan (other images or settings); "
                "re-run with --force to replace them, or choose another output folder"
            )
        _remove_plan_files(out, old)
    elif old is not None and force:
        _remove_plan_files(out, old)
    elif old is None and any(out.glob(f"{settings.name}-*.tar")) and not force:
        raise RuntimeError(
            f"{out} already holds {settings.name}-*.tar shards not written by {section}; "
            "choose another output folder (or --force to write beside them)"
        )
    write_json(plan_file, plan)
    summary_file = out / SUMMARY_FILE
    if summary_file.is_file() and not force:
        summary = json.loads(summary_file.read_text())
        if summary.get("fingerprint") == plan["fingerprint"] and all((out / s).is_file() for s in names):
            log.info("%s: %s already complete (%d shards), skipping; use --force to rewrite", section, out, num_shards)
            return summary

    order = np.arange(n, dtype=np.int64)
    if settings.shuffle:
        from dinov2.data.seeding import numpy_rng  # lazy: torch (~2 s); curation modules import without it

        numpy_rng(settings.seed, n).shuffle(order)
    todo = [s for s in range(num_shards) if not (out / names[s]).is_file()]
    done_samples = n - sum(
        len(order[s * settings.samples_per_shard : (s + 1) * settings.samples_per_shard]) for s in todo
    )
    log.info(
        "%s: %d images -> %d shards of %d in %s; %d to write",
        section,
        n,
        num_shards,
        settings.samples_per_shard,
        out,
        len(todo),
    )
    bar = tqdm(total=n, initial=done_samples, desc=section, unit="img", disable=not progress, smoothing=0.1)
    width = _width(n)
    read = functools.partial(_try_read, verify=settings.verify)
    threads = max(1, settings.num_threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for s in todo:
            first = s * settings.samples_per_shard
            positions = order[first : first + settings.samples_per_shard]
            skipped: list[str] = []
            with ShardWriter(out / names[s]) as writer:
                for chunk in range(0, len(positions), READ_AHEAD * threads):  # bounded: images held in memory
                    items = [source.item(int(i)) for i in positions[chunk : chunk + READ_AHEAD * threads]]
                    for j, (item, result) in enumerate(zip(items, pool.map(read, items)), start=first + chunk):
                        if isinstance(result, str):
                            skipped.append(item.path)
                            log.warning("%s: skipping unreadable image %s (%s)", section, item.path, result)
                        else:
                            writer.add(f"{j:0{width}d}", *result)
                        bar.update(1)
                write_json(
                    out / PLAN_DIR / f"{s:06d}.json", {"shard": names[s], "count": writer.count, "skipped": skipped}
                )
            bar.set_postfix(shard=s)
    bar.close()

    receipts = [json.loads((out / PLAN_DIR / f"{s:06d}.json").read_text()) for s in range(num_shards)]
    skipped_all = [p for r in receipts for p in r["skipped"]]
    write_lines(out / "skipped.txt", skipped_all)
    summary = {
        "fingerprint": plan["fingerprint"],
        "output": str(out),
        "dataset_path": dataset_path(out, settings, num_shards),
        "n_images": n,
        "n_samples": sum(r["count"] for r in receipts),
        "n_skipped": len(skipped_all),
        "n_shards": num_shards,
        "shards_written": len(todo),
        "samples_per_shard": [r["count"] for r in receipts],
    }
    write_json(summary_file, summary)
    log.info(
        "%s: %d samples in %d shards; train with data.dataset.kind=shards data.dataset.path='%s'",
        section,
        summary["n_samples"],
        num_shards,
        summary["dataset_path"],
    )
    return summary


def _try_read(item: PackItem, verify: bool) -> tuple[bytes, str, int, dict[str, Any]] | str:
    """:func:`read_item`, or the error as text (a bad image must not stop the pack)."""
    try:
        return read_item(item, verify)
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def read_skipped(out: str | Path) -> list[str]:
    """The images a finished shard set left out (``skipped.txt``)."""
    return read_lines(Path(out) / "skipped.txt")


# ------------------------------------------------------------------------------------------- stage
def run_pack(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``pack`` stage (see the module docstring); returns the summary."""
    cfg = cfg or CurationConfig()
    p = cfg.pack
    source = PackInput(p.kind, os.path.abspath(os.path.expanduser(p.path)) if p.path else "")
    return write_shard_set(source, resolve_path(workdir, p.output), p, force=force, progress=cfg.progress)
