"""Connected components of an undirected graph given as edge arrays.

Two implementations with the same result:

* :class:`UnionFind`: the classic disjoint-set forest (path compression + union by size), for
  incremental use and as a readable reference. Pure Python, about a microsecond per edge.
* :func:`connected_components`: a vectorised numpy version for millions of edges. Each round
  hooks every root to the smallest root it shares an edge with (``np.minimum.at``), then
  compresses the forest by pointer jumping (``parent = parent[parent]``) until every node points
  at its root. Hooking always goes to a smaller index, so no cycle can form and every
  component ends as one tree whose root is its smallest member. Rounds repeat until no edge
  joins two different roots; in practice a handful of rounds.

Both return labels numbered 0..C-1 in order of each component's smallest member.
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path compression and union by size."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, a: int) -> int:
        """The root of ``a``'s set; compresses the path on the way back."""
        root = a
        parent = self.parent
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> bool:
        """Merge the sets of ``a`` and ``b``; False when they already were one set."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True

    def labels(self) -> np.ndarray:
        """Component label per element, 0..C-1 in order of each component's smallest member."""
        roots = np.fromiter((self.find(a) for a in range(len(self.parent))), np.int64, len(self.parent))
        return _relabel(roots)


def _relabel(roots: np.ndarray) -> np.ndarray:
    """Map arbitrary root ids to 0..C-1, numbered by first appearance."""
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # component ids sorted by smallest member
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse].astype(np.int64)


def _compress(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until every node points at its root."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label (int64, 0..C-1 by smallest member) of each of ``n`` nodes joined by edges i–j."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    if i.shape != j.shape:
        raise ValueError("edge arrays i and j must have the same length")
    if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    parent = np.arange(n, dtype=np.int64)
    while i.size:
        ri, rj = parent[i], parent[j]
        differ = ri != rj
        if not differ.any():
            break
        i, j, ri, rj = i[differ], j[differ], ri[differ], rj[differ]  # drop settled edges
        lo, hi = np.minimum(ri, rj), np.maximum(ri, rj)
        np.minimum.at(parent, hi, lo)  # hook each root to its smallest neighbouring root
        parent = _compress(parent)
    # every root is its component's smallest member, so roots are already in first-appearance order
    return _relabel(parent)
