"""Retrieval on real CIFAR-10 images with a fixed, training-free embedding.

The embedding concatenates three hand-made descriptors, each L2-normalised: a 4x4-cell histogram
of gradient orientations (shape), 8x8 mean-centred downsampled pixels (layout) and a 4x4x4 colour
histogram (colour). It is weak — a trained ViT is far better — but class retrieval with it is
clearly above the 10 % chance level, which is enough to check the retrieval stage on real images.
Needs ``../shared/data`` (the ``shared_data`` fixture of conftest.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
from data_curation import embeddings as emb_io
from data_curation.config import CurationConfig, QuerySetConfig
from data_curation.index import build_index, search
from data_curation.retrieve import run_retrieve

pytest.importorskip("faiss")
Image = pytest.importorskip("PIL.Image")

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_small(data: Path, split: str):
    """The balanced cifar10-small split: uint8 images (N, 32, 32, 3) and labels."""
    full = data / "cifar10"
    blob = np.load(full / f"{split}_jpeg.npy")
    offsets = np.load(full / f"{split}_jpeg_offsets.npy")
    idx = np.load(data / "cifar10-small" / f"{split}_idx.npy")
    images = np.stack([
        np.asarray(Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
        for i in idx
    ])
    return images, np.load(full / f"{split}_y.npy")[idx].astype(np.int64)


def _unit(a):
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def gradient_histograms(images, cells=4, bins=8):
    """Magnitude-weighted histograms of unsigned gradient orientation per cell (square-rooted)."""
    g = images.astype(np.float32).mean(-1)
    gx, gy = np.zeros_like(g), np.zeros_like(g)
    gx[:, :, 1:-1] = g[:, :, 2:] - g[:, :, :-2]
    gy[:, 1:-1] = g[:, 2:] - g[:, :-2]
    magnitude = np.hypot(gx, gy)
    orientation = np.minimum(((np.arctan2(gy, gx) % np.pi) / np.pi * bins).astype(int), bins - 1)
    n, size = len(images), images.shape[1] // cells
    cell_of = (np.arange(images.shape[1]) // size)
    cell_index = (cell_of[:, None] * cells + cell_of[None, :])[None]  # (1, H, W)
    flat = (np.arange(n)[:, None, None] * cells * cells + cell_index) * bins + orientation
    hist = np.bincount(flat.ravel(), weights=magnitude.ravel(), minlength=n * cells * cells * bins)
    hist = hist.reshape(n, -1)
    return np.sqrt(hist / (hist.sum(1, keepdims=True) + 1e-6))


def tiny_pixels(images, size=8):
    """Mean-centred size x size x 3 block averages."""
    n, s = len(images), images.shape[1] // size
    x = images.astype(np.float32).reshape(n, size, s, size, s, 3).mean((2, 4)).reshape(n, -1) / 255
    return x - x.mean(1, keepdims=True)


def colour_histograms(images, bins=4):
    """Square-rooted joint RGB histogram with bins^3 cells."""
    q = (images // (256 // bins)).astype(np.int64)
    code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    n = len(images)
    flat = (np.arange(n)[:, None] * bins**3 + code.reshape(n, -1)).ravel()
    hist = np.bincount(flat, minlength=n * bins**3).reshape(n, -1).astype(np.float32)
    return np.sqrt(hist / hist.sum(1, keepdims=True))


def fixed_embedding(images):
    """Concatenated descriptors (weights 1, 0.5, 0.5), L2-normalised."""
    parts = [_unit(gradient_histograms(images)), 0.5 * _unit(tiny_pixels(images)),
             0.5 * _unit(colour_histograms(images))]
    return _unit(np.hstack(parts)).astype(np.float32)


@pytest.fixture(scope="module")
def cifar_embeddings(shared_data):
    train_x, train_y = load_small(shared_data, "train")
    test_x, test_y = load_small(shared_data, "test")
    return fixed_embedding(train_x), train_y, fixed_embedding(test_x), test_y


def test_class_queries_retrieve_their_class(cifar_embeddings, tmp_path):
    pool, pool_y, queries, query_y = cifar_embeddings
    k, chance = 10, 0.1
    _, nn = search(build_index(pool, kind="flat", use_gpu=False), queries, k)
    hit = pool_y[nn] == query_y[:, None]
    per_class = [hit[query_y == c].mean() for c in range(10)]
    print(f"\nCIFAR-10 retrieval with a fixed embedding: precision@{k} per query class (chance {chance:.2f})")
    for c, p in enumerate(per_class):
        print(f"  {CLASSES[c]:<10} {p:.3f}")
    print(f"  {'mean':<10} {np.mean(per_class):.3f}")
    assert np.mean(per_class) > 2.5 * chance
    assert min(per_class) > 1.5 * chance

    # the retrieve stage, queries = the 500 test ships: the union of their neighbours is mostly ships
    ship = CLASSES.index("ship")
    emb_io.write_embeddings(tmp_path / "embeddings", pool, [f"train/{i}" for i in range(len(pool))])
    emb_io.write_embeddings(tmp_path / "ships", queries[query_y == ship])
    cfg = CurationConfig(progress=False)
    cfg.retrieve.query_sets = [QuerySetConfig(path="ships", k=k)]
    summary = run_retrieve(tmp_path, cfg)
    selected = np.load(tmp_path / "retrieve" / "selected.npy")
    precision = (pool_y[selected] == ship).mean()
    print(f"retrieve stage, ship queries: {summary['n_selected']} images selected, {precision:.3f} ships "
          f"(pool: {(pool_y == ship).mean():.3f})")
    assert precision > 2.5 * chance
