"""Images named by a list file: ``.txt`` (one path per line, optional label) or ``.csv``.

Text lists: one path per line, blank lines and ``#`` comments ignored; if the last comma- or
whitespace-separated token of a line is an integer, it is the label. CSV lists: a header row with a
``path`` column (and optionally ``label``), or no header with the path in the first column and an
optional label in the second. Labels are integers, or class names mapped to the index of the name
in sorted order; an empty label is -1. Relative paths are relative to the list file's folder.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from dinov2.data.base import require_path
from dinov2.data.image_files import ImageFilesDataset
from dinov2.data.string_array import StringArray


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def parse_text_line(line: str) -> tuple[str, str | None] | None:
    """``(path, label text or None)`` for one line of a text list; None for blanks and comments."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    head, sep, tail = line.rpartition(",")
    if not sep:
        parts = line.rsplit(None, 1)
        head, tail = (parts[0], parts[1]) if len(parts) == 2 else ("", line)
    if head and _as_int(tail.strip()) is not None:
        return head.strip(), tail.strip()
    return line, None


def read_text_list(path: str) -> tuple[list[str], list[str | None]]:
    paths: list[str] = []
    labels: list[str | None] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parsed = parse_text_line(line)
            if parsed is not None:
                paths.append(parsed[0])
                labels.append(parsed[1])
    return paths, labels


def read_csv_rows(path: str) -> tuple[list[str] | None, list[list[str]]]:
    """``(header or None, data rows)``; the first row is a header when one of its cells is ``path``."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if rows and "path" in [cell.strip().lower() for cell in rows[0]]:
        return [cell.strip().lower() for cell in rows[0]], rows[1:]
    return None, rows


def column(rows: list[list[str]], index: int | None) -> list[str | None]:
    """Cell ``index`` of every row, stripped; None where the row is short or ``index`` is None."""
    if index is None:
        return [None] * len(rows)
    return [row[index].strip() if index < len(row) else None for row in rows]


def read_csv_list(path: str) -> tuple[list[str], list[str | None]]:
    header, rows = read_csv_rows(path)
    path_col, label_col = (0, 1) if header is None else (header.index("path"), None)
    if header is not None and "label" in header:
        label_col = header.index("label")
    return [p or "" for p in column(rows, path_col)], column(rows, label_col)


def encode_labels(raw: list[str | None]) -> tuple[np.ndarray, list[str]]:
    """Integer labels from label texts: integers as they are, else names → sorted index; empty → -1."""
    present = [r for r in raw if r]
    if all(_as_int(r) is not None for r in present):
        return np.array([int(r) if r else -1 for r in raw], dtype=np.int64), []
    classes = sorted(set(present))
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[r] if r else -1 for r in raw], dtype=np.int64), classes


class FileListDataset(ImageFilesDataset):
    """The images a ``.txt`` or ``.csv`` list names, in list order, with their optional labels."""

    def __init__(self, path: str | os.PathLike, *, max_bad_fraction: float = 0.5, min_attempts: int = 20):
        super().__init__(max_bad_fraction=max_bad_fraction, min_attempts=min_attempts)
        self.source = require_path(path, directory=False)
        self.base_dir = os.path.dirname(os.path.abspath(self.source))
        paths, raw_labels = self._read(self.source)
        if not paths:
            raise ValueError(f"{self.source} lists no images")
        if any(not p for p in paths):
            raise ValueError(f"{self.source} has a row with an empty path")
        self.labels, self.classes = encode_labels(raw_labels)
        self._paths = StringArray(paths)

    def _read(self, path: str) -> tuple[list[str], list[str | None]]:
        return read_csv_list(path) if path.lower().endswith(".csv") else read_text_list(path)
