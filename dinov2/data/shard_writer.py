"""Writing one tar shard in the webdataset layout, atomically, with its offset index.

Members of sample ``key``: ``{key}.{jpg|jpeg|png|webp}`` (the encoded image as given), ``{key}.cls``
(the integer label as text, only when the label is known) and ``{key}.json`` (metadata, when
given). Headers carry no time, owner or mode of the writing machine, so the same samples always
make the same bytes.

The tar is written under a temporary name in the target folder; :meth:`ShardWriter.close` indexes
it (:mod:`dinov2.data.shard_index`), stores the index beside the final name and only then renames
the tar into place, so "the shard exists" means "the shard is complete" — the rule that makes
packing resumable shard by shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from dinov2.data.shard_index import IMAGE_EXTS, INDEX_SUFFIX, ShardIndex, build_index


class ShardWriter:
    """``with ShardWriter(path) as w: w.add(key, image_bytes, "jpg", label=3, metadata={...})``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._keys: set[str] = set()
        self.count = 0

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add(
        self,
        key: str,
        image: bytes,
        ext: str,
        label: int | None = None,
        metadata: dict[str, Any] | bytes | None = None,
    ) -> None:
        """Append one sample. ``key`` must be new in this shard and hold no dot in its last part."""
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image extension must be one of {', '.join(IMAGE_EXTS)}, got {ext!r}")
        if not key or "." in key.rsplit("/", 1)[-1] or key in self._keys:
            raise ValueError(f"sample key {key!r} is empty, has a dot in its name, or is repeated")
        self._keys.add(key)
        self._member(f"{key}.{ext}", image)
        if label is not None and label >= 0:
            self._member(f"{key}.cls", str(int(label)).encode())
        if metadata is not None:
            data = metadata if isinstance(metadata, bytes) else json.dumps(metadata, sort_keys=True).encode()
            self._member(f"{key}.json", data)
        self.count += 1

    def close(self) -> ShardIndex:
        """Finish the tar, store its index beside the final name, move the tar into place."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o644)
        index = build_index(self._tmp)  # size and mtime survive the rename below
        index.save(self.path.with_name(self.path.name + INDEX_SUFFIX))
        os.replace(self._tmp, self.path)
        return index

    def abort(self) -> None:
        """Drop the partial shard (nothing appears at ``path``)."""
        try:
            self._tar.close()
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
