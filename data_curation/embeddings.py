"""The on-disk embedding format that every curation stage reads.

An embeddings directory (by default ``<workdir>/embeddings``) holds::

    emb_00000.npy  emb_00001.npy  ...     (rows, dim) float16 or float32, rows L2-normalised
    paths_00000.txt  ...                  one path/id per row of the matching shard (optional)
    skipped_00000.txt  ...                inputs of that shard that could not be embedded (optional)
    paths.txt                             every row's path/id, in global row order  (finalize)
    skipped.txt                           every skipped input                        (finalize)
    meta.json                             dim, dtype, count, shard sizes, model id   (finalize)

Writers (the ``embed`` stage) call :func:`write_shard` once per shard. Shard ``i`` covers a fixed,
contiguous slice of the writer's input list, so a resumed writer skips every shard for which
:func:`shard_done` is true. The ``.npy`` is written last and atomically: its existence means the
shard (and its paths and skipped files) is complete. When all shards exist, the writer calls
:func:`finalize_embeddings`, which checks the shards, concatenates the per-shard path lists and
writes ``meta.json``; readers require ``meta.json``.

Global row ``r`` is row ``r - start`` of the shard whose rows start at ``start``; every stage refers
to images by these global row indices (int64).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_curation.atomic import read_lines, save_npy, write_json, write_lines
from data_curation.errors import CurationError

FORMAT_NAME = "dinov2-curation-embeddings"
FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"^emb_(\d{5,})\.npy$")


def shard_path(directory: str | Path, shard_idx: int) -> Path:
    """Path of the ``.npy`` file of shard ``shard_idx``."""
    return Path(directory) / f"emb_{shard_idx:05d}.npy"


def shard_done(directory: str | Path, shard_idx: int) -> bool:
    """True when shard ``shard_idx`` was completely written (a resumed writer skips it)."""
    return shard_path(directory, shard_idx).is_file()


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm, in float32; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def write_shard(
    directory: str | Path,
    shard_idx: int,
    array: np.ndarray,
    paths: Sequence[str] | None = None,
    skipped: Sequence[str] = (),
    dtype: str = "float16",
    normalize: bool = True,
) -> Path:
    """Write one shard atomically: paths and skipped lists first, the ``.npy`` last.

    ``array`` is (rows, dim); rows are L2-normalised unless ``normalize`` is False (the format
    requires normalised rows; pass False only for data that already is). ``paths`` gives one
    path/id per row; without it, finalize uses global row numbers as ids. ``skipped`` lists the
    inputs of this shard that could not be read (recorded, not embedded).
    """
    directory = Path(directory)
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"a shard must be 2-D (rows, dim), got shape {array.shape}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if paths is not None:
        if len(paths) != len(array):
            raise ValueError(f"shard {shard_idx}: {len(paths)} paths for {len(array)} rows")
        write_lines(directory / f"paths_{shard_idx:05d}.txt", (_check_line(p) for p in paths))
    if skipped:
        write_lines(directory / f"skipped_{shard_idx:05d}.txt", (_check_line(p) for p in skipped))
    data = l2_normalize(array) if normalize else np.asarray(array, dtype=np.float32)
    return save_npy(shard_path(directory, shard_idx), data.astype(dtype))


def _check_line(text: str) -> str:
    text = str(text)
    if "\n" in text or "\r" in text:
        raise ValueError(f"paths/ids may not contain newlines: {text!r}")
    return text


def list_shards(directory: str | Path) -> list[int]:
    """Indices of the shards present, sorted."""
    directory = Path(directory)
    found = [int(m.group(1)) for p in directory.glob("emb_*.npy") if (m := _SHARD_RE.match(p.name))]
    return sorted(found)


def finalize_embeddings(
    directory: str | Path,
    model_id: str = "",
    source: str = "",
    root: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the shards, write ``paths.txt``, ``skipped.txt`` and ``meta.json``; return the meta.

    Shards must be numbered 0..S-1 without gaps and share dim and dtype. ``source`` names the data
    source (it becomes the manifest's ``source`` column); ``root`` (optional) is the folder that
    relative paths are relative to. Re-running it gives the same files.
    """
    directory = Path(directory)
    shards = list_shards(directory)
    if not shards:
        raise FileNotFoundError(f"no emb_*.npy shards in {directory}")
    if shards != list(range(len(shards))):
        missing = sorted(set(range(shards[-1] + 1)) - set(shards))
        raise ValueError(f"{directory}: shards missing: {missing[:10]}")
    sizes, dims, dtypes = [], set(), set()
    for s in shards:
        arr = np.load(shard_path(directory, s), mmap_mode="r")
        sizes.append(int(arr.shape[0]))
        dims.add(int(arr.shape[1]))
        dtypes.add(str(arr.dtype))
    if len(dims) != 1 or len(dtypes) != 1:
        raise ValueError(f"{directory}: shards disagree on dim {sorted(dims)} or dtype {sorted(dtypes)}")
    paths, skipped, start = [], [], 0
    for s, size in zip(shards, sizes):
        pfile = directory / f"paths_{s:05d}.txt"
        shard_paths = read_lines(pfile) if pfile.is_file() else [str(start + r) for r in range(size)]
        if len(shard_paths) != size:
            raise ValueError(f"{pfile}: {len(shard_paths)} lines for {size} rows")
        paths.extend(shard_paths)
        sfile = directory / f"skipped_{s:05d}.txt"
        if sfile.is_file():
            skipped.extend(read_lines(sfile))
        start += size
    write_lines(directory / "paths.txt", paths)
    write_lines(directory / "skipped.txt", skipped)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dim": dims.pop(),
        "dtype": dtypes.pop(),
        "count": start,
        "shard_sizes": sizes,
        "num_skipped": len(skipped),
        "model_id": model_id,
        "source": source,
        "root": root,
        **(extra or {}),
    }
    write_json(directory / "meta.json", meta)
    return meta


def write_embeddings(
    directory: str | Path,
    x: np.ndarray,
    paths: Sequence[str] | None = None,
    shard_size: int = 100_000,
    dtype: str = "float16",
    model_id: str = "",
    source: str = "",
) -> dict[str, Any]:
    """Write a whole in-memory array as shards and finalize (for tests, benchmarks, eval sets)."""
    x = np.asarray(x)
    for s, start in enumerate(range(0, max(len(x), 1), shard_size)):
        chunk_paths = None if paths is None else paths[start : start + shard_size]
        write_shard(directory, s, x[start : start + shard_size], chunk_paths, dtype=dtype)
    return finalize_embeddings(directory, model_id=model_id, source=source)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of an embeddings directory (written by :func:`finalize_embeddings`)."""
    meta_file = Path(directory) / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{meta_file} not found: embeddings are missing or not finalized "
            "(run the embed stage, or data_curation.embeddings.finalize_embeddings)"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{meta_file} is not a {FORMAT_NAME} meta file")
    return meta


def check_dim(directory: str | Path, dim: int, name: str) -> None:
    """A :class:`CurationError` unless the embeddings in ``directory`` (called ``name`` in the message)
    are ``dim``-d like the pool's."""
    found = read_meta(directory)["dim"]
    if found != dim:
        raise CurationError(f"{name} has {found}-d embeddings, the pool {dim}-d")


def embeddings_fingerprint(directory: str | Path) -> str:
    """A hash of ``meta.json``: changes whenever the embeddings are rewritten differently."""
    read_meta(directory)  # validates
    return hashlib.sha256((Path(directory) / "meta.json").read_bytes()).hexdigest()[:16]


def read_paths(directory: str | Path) -> list[str]:
    """Path/id of every row, in global row order."""
    meta = read_meta(directory)
    paths = read_lines(Path(directory) / "paths.txt")
    if len(paths) != meta["count"]:
        raise ValueError(f"{directory}/paths.txt has {len(paths)} lines, meta.json says {meta['count']}")
    return paths


def iter_shards(directory: str | Path, mmap: bool = True, dtype: Any = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start_row, shard_array)`` per shard in order; ``dtype`` converts (copies) each shard."""
    meta = read_meta(directory)
    start = 0
    for s, size in enumerate(meta["shard_sizes"]):
        arr = np.load(shard_path(directory, s), mmap_mode="r" if mmap else None)
        if arr.shape != (size, meta["dim"]):
            raise ValueError(f"shard {s} of {directory} has shape {arr.shape}, meta.json says {size} rows")
        yield start, (arr if dtype is None else np.asarray(arr, dtype=dtype))
        start += size


def load_embeddings(directory: str | Path, mmap: bool = True) -> tuple[np.ndarray, list[str]]:
    """All rows as one float32 (count, dim) array, and their paths.

    A single float32 shard opened with ``mmap`` is returned as a read-only memory map (no copy);
    otherwise the shards are read (memory-mapped one at a time) into one new float32 array.
    """
    meta = read_meta(directory)
    paths = read_paths(directory)
    if len(meta["shard_sizes"]) == 1 and meta["dtype"] == "float32" and mmap:
        return np.load(shard_path(directory, 0), mmap_mode="r"), paths
    out = np.empty((meta["count"], meta["dim"]), dtype=np.float32)
    for start, shard in iter_shards(directory, mmap=mmap):
        out[start : start + len(shard)] = shard
    return out, paths


def valid_rows(x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Boolean mask of usable rows: finite values and a norm near 1 (zero rows mark failed inputs)."""
    ok = np.empty(len(x), dtype=bool)
    for s in range(0, len(x), batch_size):
        chunk = np.asarray(x[s : s + batch_size], dtype=np.float32)
        norms = np.linalg.norm(chunk, axis=1)
        ok[s : s + len(chunk)] = np.isfinite(chunk).all(axis=1) & (np.abs(norms - 1.0) < 0.05)
    return ok
