"""Nearest-neighbour indexes: faiss Flat / IVF / IVF-PQ (CPU or GPU) and an exact torch matmul.

All indexes use the inner-product metric by default, which is cosine similarity on the
L2-normalised embeddings. Searches run over the queries in batches so memory stays bounded by
``batch_size x k`` results plus one batch of queries; :func:`iter_search` streams the batches
for callers (dedup) that only keep a filtered part of each.

faiss is imported inside the functions, so importing this module is cheap and faiss stays an
optional dependency (``pip install dinov2-train[curation]``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from data_curation.config import IndexConfig

log = logging.getLogger(__name__)


def import_faiss() -> Any:
    """``import faiss`` with an actionable message when it is missing."""
    try:
        import faiss  # optional dependency (extra `curation`)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "data curation needs faiss: pip install faiss-cpu (or faiss-gpu), or pip install 'dinov2-train[curation]'"
        ) from e
    return faiss


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    faiss = import_faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def want_gpu(use_gpu: str | bool) -> bool:
    """Resolve ``use_gpu`` ("auto" | "true" | "false" or a bool) to a decision."""
    value = str(use_gpu).strip().lower()
    if value == "auto":
        return faiss_gpu_available()
    if value in ("true", "1", "yes"):
        if not faiss_gpu_available():
            raise RuntimeError("use_gpu=true but faiss has no GPU support or sees no GPU")
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"use_gpu must be auto, true or false, got {use_gpu!r}")


def choose_kind(n: int, kind: str = "auto", flat_max_rows: int = 200_000) -> str:
    """``auto`` → exact ``flat`` up to ``flat_max_rows`` rows, ``ivf`` above."""
    if kind == "auto":
        return "flat" if n <= flat_max_rows else "ivf"
    if kind not in ("flat", "ivf", "ivfpq"):
        raise ValueError(f"index kind must be auto, flat, ivf or ivfpq, got {kind!r}")
    return kind


def default_nlist(n: int) -> int:
    """IVF list count: about 4·√n, and at most n/39 so each list gets enough training points."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(
    x: np.ndarray,
    kind: str = "auto",
    metric: str = "ip",
    nlist: int = 0,
    nprobe: int = 32,
    pq_m: int = 0,
    pq_nbits: int = 8,
    refine: bool = False,
    refine_k_factor: float = 8.0,
    train_size: int = 0,
    use_gpu: str | bool = "auto",
    flat_max_rows: int = 200_000,
    add_batch_size: int = 65536,
    seed: int = 0,
) -> Any:
    """A faiss index holding the rows of ``x`` (any float dtype; converted batch by batch).

    ``kind``: ``flat`` (exact), ``ivf`` (IVF-Flat: exact similarities, approximate neighbours),
    ``ivfpq`` (compressed; ``refine`` re-ranks ``refine_k_factor``·k candidates with the exact
    vectors, at the cost of storing them) or ``auto`` (see :func:`choose_kind`). ``metric``:
    ``ip`` (cosine on normalised rows) or ``l2`` (squared distances). IVF is trained on a random
    sample of ``train_size`` rows (0: 64·nlist, and for IVF-PQ at least 64·2^pq_nbits for the
    sub-quantizers). On GPU the index is trained on CPU, moved, then filled; a refined IVF-PQ
    stays on CPU (faiss has no GPU refine index).
    """
    faiss = import_faiss()
    n, d = x.shape
    kind = choose_kind(n, kind, flat_max_rows)
    faiss_metric = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}[metric]
    flat = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    if kind == "flat":
        index = flat
    else:
        nlist = nlist or default_nlist(n)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(flat, d, nlist, faiss_metric)
        else:
            pq_m = pq_m or max(1, d // 8)
            if d % pq_m:
                raise ValueError(f"pq_m={pq_m} must divide the dimension {d}")
            index = faiss.IndexIVFPQ(flat, d, nlist, pq_m, pq_nbits, faiss_metric)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # silence the small-training-set warning
        rng = np.random.default_rng(seed)
        default_size = 64 * nlist if kind == "ivf" else max(64 * nlist, 64 * 2**pq_nbits)
        size = min(n, train_size or default_size)
        sample = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
        index.train(_as_f32(x[sample]))
        index.nprobe = min(nprobe, nlist)
        if kind == "ivfpq" and refine:
            index = faiss.IndexRefineFlat(index)  # faiss keeps a reference to the wrapped index
            index.k_factor = refine_k_factor  # re-rank refine_k_factor·k PQ candidates
    if want_gpu(use_gpu) and not (kind == "ivfpq" and refine):
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index.referenced_objects = [*getattr(index, "referenced_objects", []), resources]
    for s in range(0, n, add_batch_size):
        index.add(_as_f32(x[s : s + add_batch_size]))
    log.info("built %s index over %d x %d (%s)", kind, n, d, type(index).__name__)
    return index


def iter_search(
    index: Any, queries: np.ndarray, k: int, batch_size: int = 16384, progress: bool = False
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, scores, ids)`` per batch of queries; scores float32 (n_batch, k), ids int64.

    Missing neighbours (fewer than ``k`` reachable rows) have id -1. ``index`` is a faiss index or
    anything with the same ``search(queries, k)`` method (e.g. :class:`TorchFlatIndex`).
    """
    k = min(k, index.ntotal)
    starts = range(0, len(queries), batch_size)
    for s in tqdm(starts, desc="search", unit="batch", disable=not progress, leave=False):
        batch = _as_f32(queries[s : s + batch_size])
        if k == 0:  # empty database: faiss refuses k = 0
            yield s, np.empty((len(batch), 0), np.float32), np.empty((len(batch), 0), np.int64)
            continue
        scores, ids = index.search(batch, k)
        yield s, np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)


def search(
    index: Any, queries: np.ndarray, k: int, batch_size: int = 16384, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """All results of :func:`iter_search`: (scores float32 (n, k), ids int64 (n, k))."""
    k_eff = min(k, index.ntotal)
    scores = np.empty((len(queries), k_eff), dtype=np.float32)
    ids = np.empty((len(queries), k_eff), dtype=np.int64)
    for s, sc, ii in iter_search(index, queries, k, batch_size, progress):
        scores[s : s + len(sc)] = sc
        ids[s : s + len(ii)] = ii
    return scores, ids


class TorchFlatIndex:
    """Exact k-NN by matrix multiplication in torch, with the faiss ``search`` interface.

    Useful on a GPU where faiss-gpu is not installed. The database is copied once to ``device``
    (float32 by default); each query batch is multiplied against ``chunk_size`` database rows at a
    time and the per-chunk top-k are merged, so memory is bounded by batch x chunk scores.
    """

    def __init__(
        self,
        x: np.ndarray,
        device: str | None = None,
        metric: str = "ip",
        chunk_size: int = 262144,
        dtype: str = "float32",
    ):
        import torch  # lazy: torch (~2 s); curation modules import without it

        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be ip or l2, got {metric!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.metric = metric
        self.chunk_size = chunk_size
        self.ntotal, self.d = x.shape
        self._x = torch.empty((self.ntotal, self.d), dtype=self.dtype, device=self.device)
        for s in range(0, self.ntotal, chunk_size):
            self._x[s : s + chunk_size] = torch.from_numpy(_as_f32(x[s : s + chunk_size]))
        self._sq_norms = (self._x.float() ** 2).sum(1) if metric == "l2" else None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) like faiss: similarities descending for ip, squared distances ascending for l2."""
        import torch  # lazy: torch (~2 s); curation modules import without it

        from dinov2.eval.topk import running_topk

        k = min(k, self.ntotal)
        q = torch.from_numpy(_as_f32(queries)).to(self.device, self.dtype)
        q_sq = (q.float() ** 2).sum(1, keepdim=True) if self.metric == "l2" else None

        def chunks():
            for s in range(0, self.ntotal, self.chunk_size):
                chunk = self._x[s : s + self.chunk_size]
                sc = (q @ chunk.T).float()
                if self.metric == "l2":  # ||q||² - 2 q·x + ||x||², ranked by its negative
                    sc = 2 * sc - self._sq_norms[s : s + len(chunk)] - q_sq
                yield sc, torch.arange(s, s + len(chunk), device=sc.device)

        with torch.no_grad():
            best_s, best_i = running_topk(chunks(), k)
        scores = best_s if self.metric == "ip" else -best_s
        return scores.cpu().numpy().astype(np.float32), best_i.cpu().numpy().astype(np.int64)


def torch_search(
    x: np.ndarray,
    q: np.ndarray,
    k: int,
    device: str | None = None,
    batch_size: int = 4096,
    metric: str = "ip",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``q`` among the rows of ``x`` with torch matmuls (GPU when ``device`` is one)."""
    return search(TorchFlatIndex(x, device=device, metric=metric), q, k, batch_size=batch_size)


def index_from_config(x: np.ndarray, cfg: IndexConfig, metric: str = "ip", seed: int = 0) -> Any:
    """The index described by an :class:`~data_curation.config.IndexConfig` (faiss or torch)."""
    if cfg.backend == "torch":
        return TorchFlatIndex(x, device=cfg.torch_device or None, metric=metric)
    if cfg.backend != "faiss":
        raise ValueError(f"index.backend must be faiss or torch, got {cfg.backend!r}")
    return build_index(
        x,
        kind=cfg.kind,
        metric=metric,
        nlist=cfg.nlist,
        nprobe=cfg.nprobe,
        pq_m=cfg.pq_m,
        pq_nbits=cfg.pq_nbits,
        refine=cfg.refine,
        refine_k_factor=cfg.refine_k_factor,
        train_size=cfg.train_size,
        use_gpu=cfg.use_gpu,
        flat_max_rows=cfg.flat_max_rows,
        add_batch_size=cfg.add_batch_size,
        seed=seed,
    )
