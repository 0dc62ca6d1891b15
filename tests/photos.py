"""Folders of real photos as a new user has them: CIFAR-10 images (../shared/data) resized to several sizes
and aspect ratios, written as JPEG and as PNG/TIFF in every PIL mode that :mod:`dinov2.data.decode` handles."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

#: (mode, file suffix): every mode once; JPEG for RGB, L and CMYK, PNG for the rest, TIFF for 32-bit modes
MODES = [
    ("RGB", ".jpg"),
    ("RGB", ".png"),
    ("L", ".jpg"),
    ("CMYK", ".jpg"),
    ("1", ".png"),
    ("L", ".png"),
    ("LA", ".png"),
    ("P", ".png"),
    ("RGBA", ".png"),
    ("I;16", ".png"),
    ("I", ".tif"),
    ("F", ".tif"),
]
SIZES = [(32, 32), (48, 32), (40, 56), (64, 48), (36, 36), (80, 40)]  # (width, height)


def cifar_images(shared_data: Path, split: str, indices) -> list[tuple[Image.Image, int]]:
    """``(RGB image, label)`` of CIFAR-10 images ``indices`` of ``split``."""
    root = shared_data / "cifar10"
    blob = np.load(root / f"{split}_jpeg.npy", mmap_mode="r")
    offsets = np.load(root / f"{split}_jpeg_offsets.npy")
    labels = np.load(root / f"{split}_y.npy")
    out = []
    for i in indices:
        with Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())) as image:
            out.append((image.convert("RGB"), int(labels[i])))
    return out


def in_mode(rgb: Image.Image, mode: str) -> Image.Image:
    """``rgb`` as an image of PIL ``mode`` with the same picture (16-bit: grey × 257, float: grey / 255)."""
    grey = np.asarray(rgb.convert("L"))
    if mode == "I;16":
        return Image.fromarray(grey.astype(np.uint16) * 257)  # Pillow: mode I;16
    if mode == "I":
        return Image.fromarray(grey.astype(np.int32) * 257)
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255.0)
    if mode in ("LA", "RGBA"):
        image = rgb.convert(mode)
        image.putalpha(255)
        return image
    if mode == "P":
        return rgb.quantize(64)
    return rgb.convert(mode)


def save_photo(rgb: Image.Image, mode: str, path: Path) -> Path:
    image = in_mode(rgb, mode)
    assert image.mode == mode, (image.mode, mode)
    image.save(path)
    return path


def write_flat_folder(shared_data: Path, folder: Path, count: int, prefix: str = "") -> Path:
    """``folder/{prefix}{i}.jpg``: ``count`` CIFAR-10 test photos, no sub-folders (so no labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, _) in enumerate(cifar_images(shared_data, "test", range(count))):
        image.save(folder / f"{prefix}{i}.jpg")
    return folder


def write_photo_folder(
    shared_data: Path, root: Path, per_class: int, classes=(0, 1, 2), split="train", start=0
) -> Path:
    """``root/<class name>/*``: ``per_class`` photos of each of ``classes``, cycling through :data:`SIZES`
    and :data:`MODES` (so every mode and size occurs when there are enough of them)."""
    wanted = set(classes)
    labels = np.load(shared_data / "cifar10" / f"{split}_y.npy")
    picks = [i for i in range(start, len(labels)) if labels[i] in wanted]
    by_class: dict[int, list[int]] = {c: [] for c in classes}
    for i in picks:
        if len(by_class[labels[i]]) < per_class:
            by_class[labels[i]].append(i)
        if all(len(v) == per_class for v in by_class.values()):
            break
    names = (shared_data / "cifar10" / "classes.txt").read_text().split()
    n = 0
    for c, indices in by_class.items():
        folder = root / names[c]
        folder.mkdir(parents=True, exist_ok=True)
        for (image, _), i in zip(cifar_images(shared_data, split, indices), indices, strict=True):
            mode, suffix = MODES[n % len(MODES)]
            size = SIZES[n % len(SIZES)]
            save_photo(image.resize(size, Image.BICUBIC), mode, folder / f"{split}_{i}_{mode.replace(';', '')}{suffix}")
            n += 1
    return root
