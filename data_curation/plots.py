"""The pictures curation writes where a person looks: charts (matplotlib, Agg) and contact sheets (Pillow).

Charts need matplotlib (``pip install 'dinov2-train[curation]'``); without it a warning is logged and
no chart is written (the stage's JSON and markdown are written regardless). Contact sheets need only
Pillow. Every file is written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_curation.atomic import atomic_path
from data_curation.images import thumbnail

log = logging.getLogger(__name__)


def _pyplot() -> Any:
    try:
        import matplotlib  # optional dependency (extra `curation`)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional dependency (extra `curation`)
    except ImportError:
        log.warning("matplotlib is not installed: no charts (pip install matplotlib)")
        return None
    return plt


def _save(fig: Any, plt: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def similarity_histograms(
    path: str | Path, panels: Sequence[tuple[str, dict[str, np.ndarray], float | None]]
) -> Path | None:
    """One panel per ``(title, {label: cosine similarities}, threshold)``: overlaid histograms (e.g. copy
    pairs vs nearest other images) and a dashed line at the threshold (None: no threshold was found)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.2 * len(panels)), squeeze=False)
    for ax, (title, series, threshold) in zip(axes[:, 0], panels):
        values = [np.asarray(v, dtype=np.float64) for v in series.values() if len(v)]
        finite = [v[np.isfinite(v)] for v in values]
        lo = min((float(v.min()) for v in finite if v.size), default=0.0)
        bins = np.linspace(min(lo, 0.0), 1.0, 101)
        for label, v in series.items():
            v = np.asarray(v, dtype=np.float64)
            v = v[np.isfinite(v)]
            if v.size:
                ax.hist(v, bins=bins, alpha=0.55, label=f"{label} ({v.size})", density=True)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        ax.set_title(title if threshold is not None else f"{title}: no threshold reaches the target", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, plt, Path(path))


def bar_chart(
    path: str | Path,
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    ylabel: str,
    log_scale: bool = False,
    annotations: Sequence[str] | None = None,
) -> Path | None:
    """A bar per label (the stage funnel, group-size and cluster-size histograms)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(labels) + 2), 3.4))
    bars = ax.bar(range(len(labels)), values, color="#4c72b0")
    ax.set_xticks(
        range(len(labels)),
        labels,
        rotation=30 if len(labels) > 6 else 0,
        ha="right" if len(labels) > 6 else "center",
        fontsize=8,
    )
    if log_scale and any(v > 0 for v in values):
        ax.set_yscale("log")
    for bar, text in zip(bars, annotations or []):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text, ha="center", va="bottom", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, Path(path))


def contact_sheet(
    path: str | Path, rows: Sequence[tuple[str, Sequence[Any]]], thumb: int = 64, label_width: int = 230
) -> Path:
    """One row per ``(caption, images)``: the caption on the left, the images as ``thumb``-pixel squares."""
    columns = max((len(images) for _, images in rows), default=1)
    pad = 4
    sheet = Image.new(
        "RGB", (label_width + columns * (thumb + pad) + pad, max(1, len(rows)) * (thumb + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for r, (caption, images) in enumerate(rows):
        y = pad + r * (thumb + pad)
        draw.multiline_text((pad, y + 2), caption, fill="black", font=font, spacing=2)
        for c, image in enumerate(images):
            sheet.paste(thumbnail(image, thumb), (label_width + pad + c * (thumb + pad), y))
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG", optimize=True)
    return path
