"""A labelled toy dataset the package draws itself: 10 classes of shapes and textures, no download.

Each image is a random foreground colour on a random background colour with pixel noise; the class
decides only the geometry (what is drawn where, at what size or frequency), never the colours, so a
network must learn shapes to separate the classes. Image ``i`` of a split is a pure function of
``(seed, split, i)``: the same on every machine, and independent of how many images are drawn.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dinov2.data.arrays import ArrayDataset
from dinov2.data.seeding import STREAM_DEMO, numpy_rng

DEMO_CLASSES = (
    "circle",
    "square",
    "triangle",
    "horizontal_stripes",
    "vertical_stripes",
    "checkerboard",
    "ring",
    "cross",
    "dots",
    "gradient",
)
DEMO_SPLITS = {"train": 0, "test": 1}
DEFAULT_NUM_SAMPLES = {"train": 5000, "test": 1000}

# A drawing takes (rng, y, x) — pixel-centre coordinates in [0, 1) — and returns the foreground
# weight of each pixel in [0, 1] (1: foreground colour, 0: background colour).
Drawing = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _centre(rng: np.random.Generator, margin: float) -> tuple[float, float]:
    return rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)


def _circle(rng, y, x):
    r = rng.uniform(0.18, 0.36)
    cy, cx = _centre(rng, r)
    return ((y - cy) ** 2 + (x - cx) ** 2 <= r**2).astype(np.float32)


def _square(rng, y, x):
    h = rng.uniform(0.15, 0.32)
    cy, cx = _centre(rng, h)
    return ((np.abs(y - cy) <= h) & (np.abs(x - cx) <= h)).astype(np.float32)


def _triangle(rng, y, x):
    h = rng.uniform(0.18, 0.36)  # half of the base, also the half-height
    cy, cx = _centre(rng, h)
    t = (y - (cy - h)) / (2 * h)  # 0 at the apex row, 1 at the base row
    if rng.random() < 0.5:  # pointing down instead of up
        t = 1 - t
    return ((t >= 0) & (t <= 1) & (np.abs(x - cx) <= h * t)).astype(np.float32)


def _stripes(rng, coordinate):
    period = rng.uniform(0.12, 0.3)
    return (((coordinate / period + rng.random()) % 1.0) < 0.5).astype(np.float32)


def _horizontal_stripes(rng, y, x):
    return _stripes(rng, y)


def _vertical_stripes(rng, y, x):
    return _stripes(rng, x)


def _checkerboard(rng, y, x):
    cell = rng.uniform(0.1, 0.25)
    cells = np.floor(y / cell + rng.random()) + np.floor(x / cell + rng.random())
    return (cells % 2).astype(np.float32)


def _ring(rng, y, x):
    r = rng.uniform(0.22, 0.4)
    width = r * rng.uniform(0.3, 0.5)
    cy, cx = _centre(rng, r)
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    return ((d <= r) & (d >= r - width)).astype(np.float32)


def _cross(rng, y, x):
    arm = rng.uniform(0.22, 0.38)
    half_width = arm * rng.uniform(0.2, 0.35)
    cy, cx = _centre(rng, arm)
    dy, dx = np.abs(y - cy), np.abs(x - cx)
    return (((dy <= half_width) & (dx <= arm)) | ((dx <= half_width) & (dy <= arm))).astype(np.float32)


def _dots(rng, y, x):
    count = rng.integers(6, 13)
    r = rng.uniform(0.04, 0.07)
    centres = rng.uniform(r, 1 - r, size=(count, 2))
    d2 = (y[None] - centres[:, 0, None, None]) ** 2 + (x[None] - centres[:, 1, None, None]) ** 2
    return (d2.min(axis=0) <= r**2).astype(np.float32)


def _gradient(rng, y, x):
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * (y - 0.5) + np.sin(angle) * (x - 0.5)
    return np.clip(ramp / np.sqrt(0.5) + 0.5, 0.0, 1.0).astype(np.float32)


DRAWINGS: tuple[Drawing, ...] = (
    _circle,
    _square,
    _triangle,
    _horizontal_stripes,
    _vertical_stripes,
    _checkerboard,
    _ring,
    _cross,
    _dots,
    _gradient,
)


def _colours(rng: np.random.Generator, min_distance: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """A foreground and a background RGB colour in [0, 1] that differ visibly."""
    while True:
        fg, bg = rng.random(3), rng.random(3)
        if np.abs(fg - bg).mean() >= min_distance:
            return fg.astype(np.float32), bg.astype(np.float32)


def draw_demo_image(label: int, rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """One uint8 ``(image_size, image_size, 3)`` image of class ``label``."""
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    weight = DRAWINGS[label](rng, y, x)[..., None]
    fg, bg = _colours(rng)
    image = weight * fg + (1 - weight) * bg
    image += rng.normal(0.0, rng.uniform(0.0, 0.06), size=image.shape).astype(np.float32)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def generate_demo(
    split: str = "train", num_samples: int | None = None, image_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, S, S, 3), labels int64 (N,))``; classes cycle 0..9 so they are balanced."""
    if split not in DEMO_SPLITS:
        raise ValueError(f"demo split must be one of {', '.join(DEMO_SPLITS)}, got {split!r}")
    n = DEFAULT_NUM_SAMPLES[split] if num_samples is None else num_samples
    labels = np.arange(n, dtype=np.int64) % len(DEMO_CLASSES)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i in range(n):
        rng = numpy_rng(seed, STREAM_DEMO, DEMO_SPLITS[split], i)
        images[i] = draw_demo_image(int(labels[i]), rng, image_size)
    return images, labels


class DemoDataset(ArrayDataset):
    """The demo images of ``split`` (``train`` or ``test``) as a labelled in-memory dataset."""

    def __init__(self, split: str = "train", num_samples: int | None = None, image_size: int = 32, seed: int = 0):
        images, labels = generate_demo(split, num_samples, image_size, seed)
        super().__init__(images, labels, source=f"<demo:{split}>")
        self.classes = list(DEMO_CLASSES)
