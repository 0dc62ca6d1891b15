"""PCA-whitening of embeddings, fitted on the pool (``embed.whiten``).

Copy-detection descriptors concentrate their variance in a few directions that unrelated images share
(lighting, layout, the dataset's look); whitening — centring, rotating onto the principal axes and
scaling each axis to unit variance — spreads them so that cosine similarity reflects what makes an
image itself. SSCD recommends it when images of the target distribution are available; here they are
the pool. ``y = (x - mean) @ projection`` then L2-normalised, where the projection's columns are the
top ``dim`` eigenvectors of the covariance divided by ``sqrt(eigenvalue + eps)``; ``eps`` is
``1e-4 x`` the largest eigenvalue, so directions the sample barely spans are not amplified into noise.

Stored as ``whitening.npz`` (``mean``, ``projection``, ``eigenvalues``; read with ``allow_pickle=False``)
in the embeddings directory: calibration applies it to the copies it plants, so they are compared with
the pool in the same space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_curation.atomic import atomic_path

WHITENING_FILE = "whitening.npz"
EPS_RELATIVE = 1e-4


@dataclass
class Whitening:
    mean: np.ndarray  # (D,) float64
    projection: np.ndarray  # (D, dim) float64
    eigenvalues: np.ndarray  # (dim,) the variances of the kept axes, descending

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whitened rows of ``x`` ``(n, D)``, L2-normalised, float32."""
        y = (np.asarray(x, dtype=np.float64) - self.mean) @ self.projection
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        return (y / np.maximum(norms, 1e-12)).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mean=self.mean, projection=self.projection, eigenvalues=self.eigenvalues)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Whitening:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"], data["projection"], data["eigenvalues"])


def fit_whitening(x: np.ndarray, dim: int = 0) -> Whitening:
    """PCA-whitening of the rows of ``x`` (see the module docstring); ``dim`` = 0 keeps every axis."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"whitening needs at least 2 embeddings, got {n}")
    dim = d if dim <= 0 else min(dim, d)
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / n
    eigenvalues, vectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(eigenvalues)[::-1][:dim]
    eigenvalues, vectors = np.clip(eigenvalues[order], 0.0, None), vectors[:, order]
    eps = EPS_RELATIVE * max(float(eigenvalues[0]), 1e-12)
    return Whitening(mean, vectors / np.sqrt(eigenvalues + eps), eigenvalues)
