"""Atomic file writes: write to a temporary file in the same folder, then ``os.replace``.

A reader (or a resumed run) therefore sees either the previous complete file or the new complete
file, never a half-written one. That property is what makes "the file exists ⇒ the work is done"
a safe resumption rule for every curation stage.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` atomically (the file name is kept exactly; no ``.npy`` is appended)."""
    return _atomic_write(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_lines(path: str | Path, lines: Iterable[str]) -> Path:
    """Write one string per line (each must be free of newlines) atomically."""

    def write(f: IO[bytes]) -> None:
        for line in lines:
            f.write(line.encode("utf-8"))
            f.write(b"\n")

    return _atomic_write(path, write)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file written by :func:`write_lines`, without their newlines."""
    text = Path(path).read_text(encoding="utf-8")
    if not text:
        return []
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
