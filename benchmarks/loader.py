"""Decoded + augmented images/s per CPU loader worker, from tar shards, a folder and JPEG blobs.

One process with one torch thread (what a DataLoader worker is) reads the same JPEGs from three
layouts — ``data.dataset.kind=shards`` (with ``data.shuffle_window``), ``folder`` and ``blobs`` —
in the order the training sampler draws them, decodes them and applies the DINOv2 multi-crop
augmentation (2 × 224 px global + 8 × 98 px local crops, ``CropsConfig`` defaults), exactly as
:class:`dinov2.data.augmented.AugmentedDataset` does in training. Reported per layout: images/s of
decoding alone, of decoding + augmentation, and the loader workers one GPU needs to keep up with a
training step rate: ``ceil(step img/s / worker img/s)``. The step rates are the naive timm
student + teacher steps measured on an H100 (ENVIRONMENT.md, 2026-11-23: ViT-S/14 829 img/s at batch
128, ViT-L/14 132 img/s at batch 32, 2×224 + 8×98 crops, bf16); the recipe's own step is meant to
be faster, so the worker counts are lower bounds.

The images: CIFAR-10 training images (``--data``, the blobs layout) upscaled to ``--size`` with a
little noise and re-encoded as JPEG quality 90, so that decoding costs what a photo of that size
costs; synthetic smooth images when no data is given. The files are in the page cache: this is
the CPU cost, not the storage's (which is where shards help most: one open file and sequential
reads per window of shards instead of a metadata lookup per image).

    python benchmarks/loader.py --markdown docs/BENCHMARKS.md
    python benchmarks/loader.py --tiny                  # CI: 12 small images, one pass
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.devices import run_header  # noqa: E402
from benchmarks.results import load_results, save_results  # noqa: E402
from benchmarks.tables import format_table, header_lines, update_markdown  # noqa: E402
from dinov2.config import CropsConfig  # noqa: E402
from dinov2.data import BlobDataset, ImageFolderDataset  # noqa: E402
from dinov2.data.augmentations import MultiCropAugmentation  # noqa: E402
from dinov2.data.augmented import AugmentedDataset  # noqa: E402
from dinov2.data.samplers import InfiniteSampler  # noqa: E402
from dinov2.data.shard_writer import ShardWriter  # noqa: E402
from dinov2.data.shards import ShardDataset  # noqa: E402

# Naive timm student + teacher step on one H100 (ENVIRONMENT.md, measured 2026-11-23).
STEP_RATES = {"ViT-S/14": 829.0, "ViT-L/14": 132.0}
COLUMNS = [
    "layout",
    "images",
    "decode img/s",
    "decode + augment img/s",
    "wall img/s",
    *(f"workers for {m} ({r:.0f} img/s)" for m, r in STEP_RATES.items()),
]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def source_images(n: int, size: tuple[int, int], data: Path | None, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of ``size`` (w, h), quality 90: upscaled CIFAR-10 images with noise, or smooth
    synthetic ones without ``data``."""
    rng = np.random.default_rng(seed)
    out = []
    if data is not None:
        blob = np.load(data / "train_jpeg.npy", mmap_mode="r")
        offsets = np.load(data / "train_jpeg_offsets.npy")
        picks = rng.choice(len(offsets) - 1, size=n, replace=False)
    for i in range(n):
        if data is not None:
            small = Image.open(io.BytesIO(blob[offsets[picks[i]] : offsets[picks[i] + 1]].tobytes())).convert("RGB")
        else:
            small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        pixels = np.asarray(small.resize(size, Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_layouts(images: list[bytes], root: Path, per_shard: int) -> dict[str, Any]:
    """The same JPEGs as tar shards, a folder and a blobs folder; the dataset of each."""
    (root / "folder").mkdir(parents=True)
    for i, data in enumerate(images):
        (root / "folder" / f"{i:06d}.jpg").write_bytes(data)
    for s in range(math.ceil(len(images) / per_shard)):
        with ShardWriter(root / "shards" / f"bench-{s:06d}.tar") as writer:
            for i in range(s * per_shard, min((s + 1) * per_shard, len(images))):
                writer.add(f"{i:06d}", images[i], "jpg")
    (root / "blobs").mkdir()
    np.save(root / "blobs" / "train_jpeg.npy", np.frombuffer(b"".join(images), dtype=np.uint8))
    np.save(root / "blobs" / "train_jpeg_offsets.npy", np.cumsum([0] + [len(b) for b in images]).astype(np.int64))
    return {
        "shards": ShardDataset(str(root / "shards")),
        "folder": ImageFolderDataset(root / "folder"),
        "blobs": BlobDataset(root / "blobs", "train"),
    }


def sampler_order(dataset: Any, window: int) -> list[int]:
    """The first epoch of the training sampler (shards: windowed over ``window`` shards)."""
    groups = getattr(dataset, "shard_sizes", None)
    window = window if groups is not None else 0
    stream = iter(InfiniteSampler(len(dataset), seed=0, group_sizes=groups, shuffle_window=window))
    return [next(stream) for _ in range(len(dataset))]


def rate(fn, indices: list[int], rounds: int) -> tuple[float, float]:
    """Images per CPU second and per wall-clock second of ``fn(i)`` over ``indices``, each the best of
    ``rounds`` passes. CPU time is what one worker process costs on a core of its own; on a machine
    shared with other jobs the wall-clock rate is lower by however much of a core the process got."""
    cpu, wall = [], []
    for _ in range(rounds):
        tick, tock = time.process_time(), time.perf_counter()
        for i in indices:
            fn(i)
        cpu.append(time.process_time() - tick)
        wall.append(time.perf_counter() - tock)
    return len(indices) / max(min(cpu), 1e-9), len(indices) / min(wall)


def measure(args: argparse.Namespace) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The table's header and rows (see the module docstring), measured with one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs with one torch thread
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace) -> tuple[dict[str, str], list[dict[str, Any]]]:
    data = Path(args.data) if args.data and (Path(args.data) / "train_jpeg.npy").is_file() else None
    w, h = (int(v) for v in args.size.split("x"))
    images = source_images(args.images, (w, h), data)
    augment = MultiCropAugmentation(CropsConfig())
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        datasets = write_layouts(images, Path(tmp), args.per_shard)
        for name, dataset in datasets.items():
            order = sampler_order(dataset, args.window)
            augmented = AugmentedDataset(dataset, augment, seed=0)
            for i in order[: min(4, len(order))]:  # warm-up: imports, first-call costs
                augmented[i]
            decode, _ = rate(dataset.get, order, args.rounds)
            full, full_wall = rate(augmented.__getitem__, order, args.rounds)
            row = {
                "layout": name,
                "images": len(order),
                "decode img/s": decode,
                "decode + augment img/s": full,
                "wall img/s": full_wall,
            }
            for model, step in STEP_RATES.items():
                row[f"workers for {model} ({step:.0f} img/s)"] = math.ceil(step / full)
            rows.append(row)
            print(
                f"{name}: decode {decode:.1f}, decode + augment {full:.1f} img/s per CPU second "
                f"({full_wall:.1f} per wall second)",
                flush=True,
            )
    header = run_header(torch.device("cpu"))
    header.update(
        {
            "images": f"{w}x{h} JPEG q90 ({'CIFAR-10 upscaled' if data is not None else 'synthetic'}), "
            f"mean {statistics.mean(len(b) for b in images) / 1024:.0f} KiB",
            "crops": "2x224 + 8x98",
            "shards": f"{args.per_shard} samples each, shuffle window {args.window}",
            "step rates": "naive timm step on an H100 (ENVIRONMENT.md)",
        }
    )
    return header, rows


def report(header: dict[str, str], rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    title = "**CPU tiny mode (illustration, not a measurement)** — " if args.tiny else ""
    body = f"{title}{header_lines(header)}\n\n" + format_table(COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
    print("\n" + body)
    if args.markdown:
        section = "loader-tiny" if args.tiny else "loader"
        print(f"table written to {update_markdown(args.markdown, section, body)}")
    if args.json:
        save_results(args.json, header, rows)
    return body


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 blobs folder (synthetic images without it)")
    p.add_argument("--images", type=int, default=400, help="images per layout")
    p.add_argument("--size", default="500x375", help="image size WxH (ImageNet's typical 500x375)")
    p.add_argument("--per-shard", type=int, default=100, help="samples per tar shard")
    p.add_argument("--window", type=int, default=2, help="data.shuffle_window for the shards")
    p.add_argument("--rounds", type=int, default=3, help="passes per measurement (the fastest is reported)")
    p.add_argument("--tiny", action="store_true", help="CI mode: 12 images of 96x72, one pass")
    p.add_argument("--markdown", default=None, help="write/update the table in this markdown file")
    p.add_argument("--json", default=None, help="also write header and rows as JSON here")
    p.add_argument("--from-json", default=None, help="no measurement: report a saved --json")
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.size, args.per_shard, args.rounds = 12, "96x72", 4, 1
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    header, rows = load_results(args.from_json) if args.from_json else measure(args)
    report(header, rows, args)
    return rows


if __name__ == "__main__":
    main()
