"""The images behind embedding rows, for the stages that look at pixels again (``calibrate``, ``report``).

The ``embed`` stage records in ``embed_info.json`` the settings it ran with (``embed_config``: input,
model, preprocessing, descriptor). :class:`RowImages` rebuilds that input dataset and maps a global
row of the embeddings back to its record: shard ``s`` covers records ``[s·shard_size, (s+1)·shard_size)``
minus the ones listed in ``skipped_{s}.txt``. Every mapping is checked against ``paths.txt``, so an
input that changed since it was embedded is an error, not a silent mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from data_curation import embeddings as emb_io
from data_curation.atomic import read_lines
from data_curation.config import EmbedConfig
from data_curation.embed import PLAN_FILE, build_input
from data_curation.errors import CurationError

INFO_FILE = "embed_info.json"


def embed_config_of(emb_dir: str | Path) -> EmbedConfig:
    """The :class:`~data_curation.config.EmbedConfig` the embeddings in ``emb_dir`` were made with."""
    info_file = Path(emb_dir) / INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if "embed_config" not in info:
        raise CurationError(
            f"{emb_dir} was not written by `dinov2-curate embed` (no embed settings in {INFO_FILE}): calibrate and "
            "report need the images and the model behind the embeddings"
        )
    merged = OmegaConf.merge(OmegaConf.structured(EmbedConfig), info["embed_config"])
    return OmegaConf.to_object(merged)


class RowImages:
    """``load(row)``: the image of a global embedding row of ``emb_dir`` (see the module docstring)."""

    def __init__(self, emb_dir: str | Path) -> None:
        self.emb_dir = Path(emb_dir)
        self.embed_cfg = embed_config_of(emb_dir)
        plan = json.loads((self.emb_dir / PLAN_FILE).read_text())
        meta = emb_io.read_meta(emb_dir)
        self.paths = emb_io.read_paths(emb_dir)
        self.shard_size = int(plan["shard_size"])
        self.starts = np.cumsum([0, *meta["shard_sizes"]])
        try:
            self.dataset = build_input(self.embed_cfg.input)
        except (OSError, ValueError) as e:
            raise CurationError(f"cannot open the images embedded in {emb_dir}: {e}") from None
        self._records: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _shard_records(self, s: int) -> list[int]:
        """The records of shard ``s`` that have a row, in row order."""
        if s not in self._records:
            first = s * self.shard_size
            stop = min(first + self.shard_size, len(self.dataset))
            skipped_file = self.emb_dir / f"skipped_{s:05d}.txt"
            skipped = set(read_lines(skipped_file)) if skipped_file.is_file() else set()
            records = list(range(first, stop))
            if skipped:
                records = [r for r in records if self.dataset.describe(r) not in skipped]
            self._records[s] = records
        return self._records[s]

    def record(self, row: int) -> int:
        """The input record of global row ``row``."""
        s = int(np.searchsorted(self.starts, row, side="right") - 1)
        records = self._shard_records(s)
        offset = row - int(self.starts[s])
        if not 0 <= offset < len(records) or self.dataset.describe(records[offset]) != self.paths[row]:
            raise CurationError(
                f"row {row} of {self.emb_dir} is {self.paths[row]!r}, but the input now has something else there: "
                "the images changed since they were embedded (re-run embed with --force)"
            )
        return records[offset]

    def load(self, row: int) -> Image.Image:
        """The RGB image of ``row``."""
        return self.dataset.load(self.record(row)).convert("RGB")

    def describe(self, row: int) -> str:
        return self.paths[row]


def thumbnail(image: Any, size: int) -> Image.Image:
    """``image`` scaled to fit a ``size`` × ``size`` square (up or down), centred on grey."""
    image = image.convert("RGB")
    scale = size / max(image.size)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return canvas
