"""Builders of small tar shards for the shard tests (not a test module).

``write_gnu_tar_shard`` makes a shard with GNU tar from files on disk — a writer that is not ours —
and ``write_shards`` makes numbered shards with :class:`dinov2.data.shard_writer.ShardWriter`. Every
sample's ``.cls`` is its global sample number, so a test can tell which samples a run saw.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from dinov2.data.shard_writer import ShardWriter


def encoded_image(seed: int, size: int = 20, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg(seed: int) -> bytes:
    data = encoded_image(seed, fmt="JPEG")
    return data[: len(data) // 3]


def write_shards(
    folder: Path,
    num_shards: int,
    per_shard: int,
    *,
    name: str = "train",
    bad: dict[int, bytes] | None = None,
    size: int = 20,
) -> list[Path]:
    """``{name}-000000.tar`` … with ``per_shard`` PNG samples each, labelled by their global number;
    ``bad`` maps a global sample number to the bytes stored instead of its image (a corrupt member)."""
    bad = bad or {}
    paths = []
    for s in range(num_shards):
        path = folder / f"{name}-{s:06d}.tar"
        with ShardWriter(path) as writer:
            for j in range(per_shard):
                n = s * per_shard + j
                image = bad.get(n, encoded_image(n, size))
                writer.add(f"sample{n:04d}", image, "png", label=n, metadata={"n": n})
        paths.append(path)
    return paths


def write_gnu_tar_shard(path: Path, members: dict[str, bytes]) -> Path:
    """A shard made by GNU tar from ``members`` (name → bytes), in the given order."""
    staging = path.parent / (path.name + ".staging")
    for name, data in members.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
    subprocess.run(["tar", "cf", str(path), "-C", str(staging), *members], check=True)
    return path
