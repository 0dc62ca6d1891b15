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
