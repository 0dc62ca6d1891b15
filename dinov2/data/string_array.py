"""An immutable list of strings packed into two numpy arrays.

A Python list of a million path strings is touched (reference counts) by every DataLoader worker
that reads it, which copies the pages the fork shared; two flat arrays are never copied.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class StringArray:
    """Strings stored as one UTF-8 byte buffer plus offsets; ``arr[i]`` decodes string ``i``."""

    def __init__(self, strings: Iterable[str]):
        encoded = [s.encode("utf-8") for s in strings]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    @classmethod
    def from_buffers(cls, buffer: np.ndarray, offsets: np.ndarray) -> StringArray:
        """The array whose :attr:`buffer` and :attr:`offsets` these are (e.g. read back from a file)."""
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(buffer):
            raise ValueError("offsets must start at 0 and end at the buffer's length")
        strings = cls(())
        strings._buffer, strings._offsets = np.asarray(buffer, dtype=np.uint8), np.asarray(offsets, dtype=np.int64)
        return strings

    @property
    def buffer(self) -> np.ndarray:
        """Every string's UTF-8 bytes, end to end (uint8)."""
        return self._buffer

    @property
    def offsets(self) -> np.ndarray:
        """int64, ``len + 1`` entries: string ``i`` is ``buffer[offsets[i]:offsets[i + 1]]``."""
        return self._offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} strings")
        start, stop = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:stop].tobytes().decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))
