"""Atomic file writes: write to a temporary file in the same folder, then ``os.replace``.

A reader (or a resumed run) therefore sees either the previous complete file or the new complete
file, never a half-written one. That property is what makes "the file exists ⇒ the work is done"
a safe resumption rule for every curation stage.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def open_text_atomic(path: str | Path, newline: str | None = None) -> Iterator[TextIO]:
    """A UTF-8 text file that appears at ``path`` only when the ``with`` block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as f:
        yield f


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` atomically (the file name is kept exactly; no ``.npy`` is appended)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    with open_text_atomic(path, newline="") as f:
        f.write(text)
    return Path(path)


def write_lines(path: str | Path, lines: Iterable[str]) -> Path:
    """Write one string per line (each must be free of newlines) atomically."""
    with open_text_atomic(path, newline="") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file written by :func:`write_lines`, without their newlines."""
    text = Path(path).read_text(encoding="utf-8")
    if not text:
        return []
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
