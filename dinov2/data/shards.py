"""Tar shards in the webdataset layout, read at random through a per-shard offset index.

``data.dataset.kind=shards`` with ``data.dataset.path`` naming the shards:

* a brace pattern, ``/data/train-{000000..001023}.tar`` (numeric ranges keep their zero padding;
  ``{a,b}`` lists work too), several patterns joined by ``::``;
* or a folder: every ``*.tar`` in it, sorted.

Sample ``i`` of the dataset is sample ``i - start(s)`` of shard ``s`` (shards in the order given,
samples in tar order), so the dataset is an ordinary indexed :class:`ImageDataset`: the training
sampler's global positions, the per-position augmentation seeds and the skip-and-count of corrupt
images work exactly as for a folder, and a run resumes at the same sample at any world size.
``data.shuffle_window`` shuffles within windows of shards so that reads stay local
(:func:`dinov2.data.samplers.windowed_permutation`). Labels come from each sample's ``.cls``
member (-1 without one).

Each shard's index (:mod:`dinov2.data.shard_index`) is loaded or built when the dataset is created
(missing ones are built in parallel threads); ``data.dataset.index_cache_dir`` says where indexes
of read-only shards go. A sample is named ``{shard path}#{key}`` in messages and curation outputs;
:func:`read_member` reads such a name back.

Why not ``wids`` (webdataset's indexed reader): it stores its index with ``pickle`` (which this
project never loads from disk), needs a JSON descriptor with each shard's sample count, and its
samplers keep their own epoch counter, so they cannot resume at a global sample position or at
another world size; it was also removed from the webdataset repository in February 2025 (now a
separate ``wids`` package). The stdlib ``tarfile`` and an ``.npz`` of offsets do all this needs.
"""

from __future__ import annotations

import bisect
import functools
import glob
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from dinov2.data.base import ImageDataset, require_path
from dinov2.data.decode import decode_image
from dinov2.data.shard_index import ShardIndex, load_or_build_index

PATTERN_SEPARATOR = "::"
MEMBER_SEPARATOR = "#"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_OPEN_SHARDS = 64  # file descriptors kept open per process


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: ``{0..3}``, ``{000..010}``, ``{a,b}``."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = int(numeric.group(1)), int(numeric.group(2))
        width = len(numeric.group(1)) if numeric.group(1).startswith("0") and len(numeric.group(1)) > 1 else 0
        step = 1 if hi >= lo else -1
        choices = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"cannot expand '{{{body}}}' in {pattern!r}: use {{first..last}} or {{a,b,...}}")
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def expand_shard_paths(spec: str, key: str = "data.dataset.path") -> list[str]:
    """The shard files ``spec`` names (see the module docstring); each must exist."""
    if not spec:
        raise FileNotFoundError(f"no shards given; set {key} (e.g. /data/train-{{000000..000099}}.tar)")
    paths: list[str] = []
    for part in spec.split(PATTERN_SEPARATOR):
        part = os.path.expanduser(part.strip())
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(glob.escape(part), "*.tar")))
            if not found:
                raise FileNotFoundError(f"{key}={part!r} is a folder without .tar shards")
            paths += found
            continue
        expanded = expand_braces(part)
        missing = [p for p in expanded if not os.path.isfile(p)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"{key}: shard {missing[0]!r} does not exist{more}")
        paths += expanded
    return [os.path.abspath(p) for p in paths]


def load_indexes(paths: list[str], cache_dir: str | None = None, threads: int = 8) -> list[ShardIndex]:
    """The index of every shard, built in ``threads`` threads where missing (reading tar headers is I/O)."""
    load = functools.partial(load_or_build_index, cache_dir=cache_dir or None)
    if len(paths) <= 1 or threads <= 1:
        return [load(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        return list(pool.map(load, paths))


def pread_exact(fd: int, offset: int, size: int, name: str | Callable[[], str]) -> bytes:
    """``size`` bytes at ``offset``, or an ``OSError`` naming ``name`` (a string, or a function that
    makes it: only called on failure) when the file ends before them."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        name = name if isinstance(name, str) else name()
        raise OSError(f"truncated: {name} needs {size} bytes at offset {offset}, the shard has {len(data)} there")
    return data


class ShardDataset(ImageDataset):
    """Every sample with an image in the shards ``spec`` names (see the module docstring).

    ``skip_options`` are :class:`ImageDataset`'s (``max_bad_fraction``, ``min_attempts``)."""

    def __init__(self, spec: str, *, index_cache_dir: str = "", **skip_options: Any):
        super().__init__(**skip_options)
        self.shards = expand_shard_paths(spec)
        self.source = spec
        self.index_cache_dir = index_cache_dir
        indexes = load_indexes(self.shards, index_cache_dir)
        self.shard_sizes = np.array([len(ix) for ix in indexes], dtype=np.int64)
        if self.shard_sizes.sum() == 0:
            raise ValueError(f"no samples with an image member (.jpg/.jpeg/.png/.webp) in the shards {spec}")
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._starts = self.starts.tolist()
        # per-sample arrays only (a key is looked up in its shard's index when a message needs it)
        self.image_offset = np.concatenate([ix.image_offset for ix in indexes])
        self.image_size = np.concatenate([ix.image_size for ix in indexes])
        self.labels = np.concatenate([ix.label for ix in indexes])
        self._open_files = _OpenFiles(self.shards)

    # ------------------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard number, sample number in the shard)`` of dataset sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def shard_index(self, shard: int) -> ShardIndex:
        return _cached_index(self.shards[shard], self.index_cache_dir)

    def key(self, index: int) -> str:
        shard, local = self.locate(index)
        return self.shard_index(shard).keys[local]

    def describe(self, index: int) -> str:
        shard, local = self.locate(index)
        return f"{self.shards[shard]}{MEMBER_SEPARATOR}{self.shard_index(shard).keys[local]}"

    # ------------------------------------------------------------------------------ reading
    def _fd(self, shard: int) -> int:
        return self._open_files.fd(shard)

    def encoded(self, index: int) -> bytes:
        """The image member's bytes of sample ``index``."""
        shard, _ = self.locate(index)
        offset, size = int(self.image_offset[index]), int(self.image_size[index])
        return pread_exact(self._fd(shard), offset, size, lambda: self.describe(index))

    def image_name(self, index: int) -> str:
        """The image member's name in its shard (``key.jpg``...; the extension in lower case)."""
        shard, local = self.locate(index)
        return self.shard_index(shard).member_name(local)

    def metadata(self, index: int) -> bytes | None:
        """The ``.json`` member's bytes of sample ``index``, or None without one."""
        shard, local = self.locate(index)
        ix = self.shard_index(shard)
        if ix.json_offset[local] < 0:
            return None
        offset, size = int(ix.json_offset[local]), int(ix.json_size[local])
        return pread_exact(self._fd(shard), offset, size, lambda: self.describe(index))

    def load(self, index: int) -> Image.Image:
        return decode_image(io.BytesIO(self.encoded(index)))

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open_files"] = _OpenFiles(self.shards)  # descriptors do not travel to spawned workers
        return state


class _OpenFiles:
    """Read-only descriptors of the shards, opened on first use: up to ``MAX_OPEN_SHARDS`` per thread
    (least recently used closed first). Each thread has its own, so one thread never closes a
    descriptor another is reading; a forked process (a DataLoader worker) opens its own."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[tuple[int, OrderedDict[int, int]]] = []  # (pid, a thread's files), for closing

    def fd(self, shard: int) -> int:
        files = getattr(self._local, "files", None)
        if files is None or self._local.pid != os.getpid():
            files = self._local.files = OrderedDict()
            self._local.pid = os.getpid()
            with self._lock:
                self._all.append((os.getpid(), files))
        fd = files.get(shard)
        if fd is None:
            fd = files[shard] = os.open(self.paths[shard], os.O_RDONLY)
            if len(files) > MAX_OPEN_SHARDS:
                os.close(files.popitem(last=False)[1])
        else:
            files.move_to_end(shard)
        return fd

    def __del__(self):
        for pid, files in getattr(self, "_all", ()):
            if pid == os.getpid():
                for fd in files.values():
                    try:
                        os.close(fd)
                    except OSError:
                        pass


def _cached_index(shard: str, cache_dir: str) -> ShardIndex:
    """The index of ``shard`` from a per-process cache (keyed by its size and time, so a rewritten
    shard is indexed again)."""
    st = os.stat(shard)
    return _index_of_version(shard, cache_dir, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _index_of_version(shard: str, cache_dir: str, size: int, mtime_ns: int) -> ShardIndex:
    return load_or_build_index(shard, cache_dir or None)


def split_member_path(path: str) -> tuple[str, str] | None:
    """``(shard, key)`` when ``path`` names a shard sample (``/data/a.tar#key``), else None."""
    shard, sep, key = path.rpartition(MEMBER_SEPARATOR)
    if not sep or not shard.endswith(".tar") or not key or os.path.exists(path):
        return None
    return shard, key


def _key_positions(shard: str, cache_dir: str) -> dict[str, int]:
    st = os.stat(shard)
    return _key_positions_of_version(shard, cache_dir, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _key_positions_of_version(shard: str, cache_dir: str, size: int, mtime_ns: int) -> dict[str, int]:
    return _index_of_version(shard, cache_dir, size, mtime_ns).key_positions()


def read_member(path: str, index_cache_dir: str = "") -> tuple[bytes, str, int, bytes | None]:
    """``(image bytes, image extension, label, json bytes or None)`` of a shard sample named
    ``{shard}#{key}`` (as :meth:`ShardDataset.describe` writes it)."""
    parts = split_member_path(path)
    if parts is None:
        raise ValueError(f"{path!r} does not name a shard sample (expected /path/shard.tar{MEMBER_SEPARATOR}key)")
    shard, key = parts
    require_path(shard, directory=False, key=f"the shard of {path}")
    shard = os.path.abspath(shard)
    positions = _key_positions(shard, index_cache_dir)
    if key not in positions:
        raise KeyError(f"{shard} has no sample with an image named {key!r}")
    i = positions[key]
    ix = _cached_index(shard, index_cache_dir)
    with open(shard, "rb") as f:
        fd = f.fileno()
        image = pread_exact(fd, int(ix.image_offset[i]), int(ix.image_size[i]), path)
        meta = pread_exact(fd, int(ix.json_offset[i]), int(ix.json_size[i]), path) if ix.json_offset[i] >= 0 else None
    ext = ix.member_name(i).rsplit(".", 1)[-1]
    return image, ext, int(ix.label[i]), meta
