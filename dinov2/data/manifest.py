"""The curation pipeline's output: a CSV with the header ``path,source,label`` (label may be empty).

A ``path`` may name a sample of a tar shard, ``/data/train-000003.tar#key`` (what curation writes for
a pool kept as shards); it is read through the shard's offset index (:mod:`dinov2.data.shards`).
"""

from __future__ import annotations

import io

from PIL import Image

from dinov2.data.decode import decode_image
from dinov2.data.filelist import FileListDataset, column, read_csv_rows
from dinov2.data.shards import read_member, split_member_path

MANIFEST_COLUMNS = ("path", "source", "label")


def read_manifest(path: str) -> tuple[list[str], list[str], list[str | None]]:
    """``(paths, sources, label texts)`` of a manifest; a missing header or column is an error."""
    header, rows = read_csv_rows(path)
    missing = [c for c in MANIFEST_COLUMNS if header is None or c not in header]
    if missing:
        raise ValueError(
            f"{path} is not a manifest: its header lacks column(s) {', '.join(missing)} "
            f"(expected {','.join(MANIFEST_COLUMNS)})"
        )
    paths = [p or "" for p in column(rows, header.index("path"))]
    sources = [s or "" for s in column(rows, header.index("source"))]
    return paths, sources, column(rows, header.index("label"))


class ManifestDataset(FileListDataset):
    """The images of a curation manifest; ``sources[i]`` is the pool image ``i`` was drawn from."""

    def _read(self, path: str) -> tuple[list[str], list[str | None]]:
        paths, self.sources, labels = read_manifest(path)
        return paths, labels

    def load(self, index: int) -> Image.Image:
        path = self.path(index)
        if split_member_path(path) is not None:
            return decode_image(io.BytesIO(read_member(path)[0]))
        return super().load(index)
