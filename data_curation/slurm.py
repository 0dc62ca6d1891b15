"""Curation work as SLURM array jobs (submitit): sharded ``embed`` and sharded dedup k-NN search.

Two kinds of work split into ``n`` array tasks:

* ``embed``: task ``i`` writes the data shards ``s ≡ i (mod n)`` of the embed stage
  (:func:`data_curation.embed.run_embed`); the last task to finish finalizes the embeddings.
* ``dedup-search``: dedup's self k-NN search, split over the query rows. :func:`prepare_search`
  builds the index once and writes it to ``<workdir>/dedup_search/`` (faiss backend); task ``i``
  searches query block ``i`` and writes ``pairs_{i}.npy`` (skipped when present: resumable);
  :func:`merge_search` turns the parts into exactly the outputs of the ``dedup`` stage (with the
  same ``DONE`` fingerprint, so ``dinov2-curate dedup`` then finds the stage done).
  :func:`run_sharded_dedup` runs the three steps.

A task that hits its time limit is resubmitted by submitit (``checkpoint``) and resumes at the first
missing shard or part. Everything a task needs travels in the pickled task object: the work dir
and the :class:`~data_curation.config.CurationConfig` (with absolute paths).

::

    from data_curation.slurm import submit_array
    jobs = submit_array("embed", "runs/cur", cfg, num_shards=64,
                        executor_options={"slurm_partition": "gpu", "gpus_per_node": 1, "timeout_min": 240,
                                          "slurm_array_parallelism": 32})
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_curation import embeddings as emb_io
from data_curation.atomic import save_npy, write_json, write_lines
from data_curation.dedup import PAIR_DTYPE, components, components_report, dedup_report, dedup_settings, select_keep
from data_curation.embed import absolute_path, resolved_input, run_embed
from data_curation.index import import_faiss, index_from_config, iter_search, want_gpu
from data_curation.workdir import check_removed_fraction, funnel, resolve_path, run_stage

if TYPE_CHECKING:
    from data_curation.config import CurationConfig

log = logging.getLogger(__name__)

SEARCH_DIR = "dedup_search"
DEFAULT_EXECUTOR_OPTIONS = {"timeout_min": 240}  # minutes per task; a task past it is resubmitted and resumes


# ------------------------------------------------------------------------------------------ tasks
@dataclass
class ShardTask:
    """One array task: ``fn(workdir, cfg, task_index, num_tasks)`` named as ``"module:function"``."""

    fn: str
    workdir: str
    cfg: Any
    task_index: int
    num_tasks: int
    force: bool = False

    def __call__(self) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        module, name = self.fn.split(":")
        return getattr(importlib.import_module(module), name)(
            Path(self.workdir), self.cfg, self.task_index, self.num_tasks, self.force
        )

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """After a timeout or preemption submitit resubmits this task; it resumes from its files."""
        import submitit  # optional dependency (extra `slurm`)

        return submitit.helpers.DelayedSubmission(replace(self, force=False))


def embed_task(workdir: Path, cfg: CurationConfig, task_index: int, num_tasks: int, force: bool = False) -> dict:
    """Array task of the embed stage."""
    cfg = replace(cfg, embed=replace(cfg.embed, task_index=task_index, num_tasks=num_tasks))
    return run_embed(workdir, cfg, force)


def search_task(workdir: Path, cfg: CurationConfig, task_index: int, num_tasks: int, force: bool = False) -> dict:
    """Array task of dedup's sharded k-NN search."""
    return search_shard(workdir, cfg, task_index, num_tasks, force)


STAGE_TASKS = {"embed": "data_curation.slurm:embed_task", "dedup-search": "data_curation.slurm:search_task"}


def absolute_config(cfg: CurationConfig) -> CurationConfig:
    """``cfg`` with the embed stage's input and model paths made absolute (tasks may start elsewhere)."""
    e = cfg.embed
    model = replace(e.model, path=absolute_path(e.model.path), config=absolute_path(e.model.config))
    return replace(cfg, embed=replace(e, input=resolved_input(e.input), model=model))


def make_executor(folder: str | Path, options: Mapping[str, Any] | None = None) -> Any:
    """A submitit ``AutoExecutor`` logging to ``folder``; ``options`` go to ``update_parameters``
    (``cluster`` picks the executor: ``slurm``, ``local`` or ``debug``; default: auto-detected)."""
    import submitit  # optional dependency (extra `slurm`)

    options = dict(options or {})
    cluster = options.pop("cluster", None)
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(**{"name": "dinov2-curate", **options})
    return executor


def submit_array(
    stage: str | Callable[..., Any],
    workdir: str | Path,
    cfg: CurationConfig,
    num_shards: int,
    executor_options: Mapping[str, Any] | None = None,
    force: bool = False,
    log_folder: str | Path | None = None,
) -> list[Any]:
    """Submit ``num_shards`` array tasks of ``stage``; returns the submitit jobs (one per task).

    ``stage``: ``"embed"``, ``"dedup-search"`` (after :func:`prepare_search`), a ``"module:function"``
    or a module-level function, called as ``fn(workdir, cfg, task_index, num_tasks, force)``.
    ``executor_options``: submitit parameters, e.g. ``slurm_partition``, ``timeout_min``, ``mem_gb``,
    ``gpus_per_node``, ``cpus_per_task``, ``slurm_array_parallelism`` (tasks running at once),
    ``cluster`` (``debug`` runs in this process, ``local`` in subprocesses).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if callable(stage):
        fn = f"{stage.__module__}:{stage.__name__}"
    else:
        fn = STAGE_TASKS.get(stage, stage)
        if ":" not in fn:
            raise ValueError(f"unknown stage {stage!r}: use {', '.join(STAGE_TASKS)} or 'module:function'")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(log_folder) if log_folder else workdir / "slurm_logs" / "%j"
    options = {**DEFAULT_EXECUTOR_OPTIONS, **(executor_options or {})}
    executor = make_executor(folder, options)
    cfg = absolute_config(cfg)
    tasks = [ShardTask(fn, str(workdir), cfg, i, num_shards, force) for i in range(num_shards)]
    jobs = executor.submit_array(tasks)
    log.info("submitted %d tasks of %s (job %s)", num_shards, fn, jobs[0].job_id if jobs else "-")
    return jobs


def wait_all(jobs: list[Any]) -> list[Any]:
    """Results of all jobs (raises the first task failure, with its log)."""
    return [job.result() for job in jobs]


# ------------------------------------------------------------------------------------------ search
class ShardedRows:
    """Rows ``rows`` (global, sorted) of an embeddings dir, read on demand from the memory-mapped
    shards as float32: ``len``, ``shape``, slices and integer-array indexing, like an array.

    Lets the index be built and the queries be read without loading every embedding into memory
    (a task holds the index and its query block only).
    """

    def __init__(self, directory: str | Path, rows: np.ndarray | None = None):
        meta = emb_io.read_meta(directory)
        self._shards = [arr for _, arr in emb_io.iter_shards(directory, mmap=True)]
        self._starts = np.cumsum([0] + [len(a) for a in self._shards])
        self.rows = np.arange(meta["count"], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), int(meta["dim"]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        wanted = self.rows[key]
        if wanted.ndim == 0:
            return self._gather(wanted[None])[0]
        order = np.argsort(wanted, kind="stable")
        out = np.empty((len(wanted), self.shape[1]), dtype=np.float32)
        out[order] = self._gather(wanted[order])
        return out

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """Sorted global rows → float32, one shard at a time."""
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            local = rows[sel] - self._starts[s]
            lo, hi = int(local[0]), int(local[-1]) + 1
            if hi - lo == len(local):  # contiguous: one slice
                out[sel] = self._shards[s][lo:hi]
            else:
                out[sel] = self._shards[s][local]
        return out


class LineFile:
    """Random access to the lines of a large text file (e.g. ``paths.txt`` of a billion images)
    through an array of line offsets, without holding the lines in memory."""

    def __init__(self, path: str | Path, chunk: int = 1 << 26):
        self.path = Path(path)
        ends = []
        with open(self.path, "rb") as f:
            pos = 0
            while block := f.read(chunk):
                ends.append(pos + np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10))
                pos += len(block)
        ends = np.concatenate(ends) if ends else np.empty(0, np.int64)
        self._starts = np.r_[0, ends[:-1] + 1].astype(np.int64) if len(ends) else ends
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(int(self._starts[i]))
            return f.read(int(self._ends[i] - self._starts[i])).decode("utf-8")


class _Subset:
    """``seq[rows[i]]`` for ``i`` in ``range(len(rows))``, looked up lazily."""

    def __init__(self, seq: Any, rows: np.ndarray):
        self.seq, self.rows = seq, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.seq[int(self.rows[i])]


def usable_rows(directory: str | Path) -> np.ndarray:
    """Global rows with a finite, normalised embedding (shard by shard, never all in memory)."""
    parts = [start + np.flatnonzero(emb_io.valid_rows(shard)) for start, shard in emb_io.iter_shards(directory)]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def _dedup_fingerprint(workdir: Path, cfg: CurationConfig) -> str:
    """The fingerprint the dedup stage gives its DONE file (``data_curation.dedup.dedup_settings``)."""
    return dedup_settings(Path(workdir), cfg)[1]


def _search_plan(folder: Path) -> dict[str, Any]:
    plan_file = folder / "plan.json"
    if not plan_file.is_file():
        raise FileNotFoundError(f"{plan_file} not found: run data_curation.slurm.prepare_search first")
    return json.loads(plan_file.read_text())


def prepare_search(
    workdir: str | Path, cfg: CurationConfig, num_shards: int, rescore_margin: float = 0.0
) -> dict[str, Any]:
    """Build the dedup index once (faiss: ``dedup_search/index.faiss``) and cut the queries into blocks.

    ``rescore_margin > 0`` (for a compressed ``ivfpq`` index, whose similarities are approximate):
    the tasks keep candidate pairs above ``threshold - rescore_margin`` and recompute their exact
    cosine from the embeddings before applying ``threshold``. With the default 0 the result is the
    dedup stage's exactly.
    """
    workdir = Path(workdir)
    folder = workdir / SEARCH_DIR
    d, fp = dedup_settings(workdir, cfg)  # runs calibrate first for dedup.threshold=auto
    old = folder / "plan.json"
    if old.is_file():
        plan = _search_plan(folder)
        if plan["fingerprint"] == fp and plan["num_shards"] == num_shards and plan["rescore_margin"] == rescore_margin:
            return plan
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("pairs_*.npy"):
        stale.unlink()
    old.unlink(missing_ok=True)
    emb_dir = resolve_path(workdir, cfg.embeddings)
    pool = usable_rows(emb_dir)
    save_npy(folder / "pool.npy", pool)
    if cfg.index.backend == "faiss":
        faiss = import_faiss()
        index = index_from_config(ShardedRows(emb_dir, pool), cfg.index)  # filled on a GPU when there is one
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(folder / "index.faiss"))
        del index
    bounds = np.linspace(0, len(pool), num_shards + 1).round().astype(int).tolist()
    plan = {
        "fingerprint": fp,
        "num_shards": num_shards,
        "n_pool": len(pool),
        "bounds": bounds,
        "rescore_margin": rescore_margin,
        "threshold": d.threshold,
    }
    write_json(folder / "plan.json", plan)
    return plan


def search_shard(
    workdir: str | Path, cfg: CurationConfig, task_index: int, num_tasks: int, force: bool = False
) -> dict[str, Any]:
    """Search query block ``task_index`` against the whole pool; pairs above threshold → ``pairs_{i}.npy``."""
    workdir = Path(workdir)
    folder = workdir / SEARCH_DIR
    plan = _search_plan(folder)
    if plan["num_shards"] != num_tasks:
        raise ValueError(f"the search was planned for {plan['num_shards']} tasks, not {num_tasks}")
    out = folder / f"pairs_{task_index:05d}.npy"
    if out.is_file() and not force:
        return {"task": task_index, "skipped": True}
    lo, hi = plan["bounds"][task_index], plan["bounds"][task_index + 1]
    pool = np.load(folder / "pool.npy")
    emb_dir = resolve_path(workdir, cfg.embeddings)
    rows = ShardedRows(emb_dir, pool)
    queries = ShardedRows(emb_dir, pool[lo:hi])  # read batch by batch by the search
    if cfg.index.backend == "faiss":
        faiss = import_faiss()
        index = faiss.read_index(str(folder / "index.faiss"))
        if want_gpu(cfg.index.use_gpu):
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, 0, index)
            index.referenced_objects = [resources]
    else:
        index = index_from_config(rows, cfg.index)
    k, threshold, margin = cfg.dedup.k, plan["threshold"], plan["rescore_margin"]
    found = []
    for start, sims, ids in iter_search(index, queries, k + 1, cfg.index.batch_size, cfg.progress):
        me = np.arange(lo + start, lo + start + len(ids), dtype=np.int64)[:, None]
        r, c = np.nonzero((sims > threshold - margin) & (ids >= 0) & (ids != me))
        a, b, sim = me[r, 0], ids[r, c], sims[r, c]
        if margin > 0 and len(a):  # exact cosine of the candidates
            sim = np.einsum("nd,nd->n", queries[a - lo], rows[b])
            a, b, sim = a[sim > threshold], b[sim > threshold], sim[sim > threshold]
        part = np.empty(len(a), dtype=PAIR_DTYPE)
        part["i"], part["j"], part["sim"] = np.minimum(a, b), np.maximum(a, b), sim
        found.append(part)
    pairs = np.concatenate(found) if found else np.empty(0, dtype=PAIR_DTYPE)
    save_npy(out, pairs)
    return {"task": task_index, "queries": hi - lo, "pairs": len(pairs)}


def merge_pairs(pairs: np.ndarray) -> np.ndarray:
    """Unique (i, j) pairs, each with its largest similarity (a pair is found from both ends)."""
    if len(pairs) == 0:
        return pairs
    order = np.lexsort((-pairs["sim"], pairs["j"], pairs["i"]))
    pairs = pairs[order]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = (pairs["i"][1:] != pairs["i"][:-1]) | (pairs["j"][1:] != pairs["j"][:-1])
    return pairs[first]


def merge_search(workdir: str | Path, cfg: CurationConfig, force: bool = False) -> dict[str, Any]:
    """The dedup stage's outputs from the search parts (all must be present)."""
    workdir = Path(workdir)
    folder = workdir / SEARCH_DIR
    plan = _search_plan(folder)
    d, fp = dedup_settings(workdir, cfg)
    if plan["fingerprint"] != fp:
        raise RuntimeError("the search parts were made for other embeddings or settings: run prepare_search again")
    missing = [i for i in range(plan["num_shards"]) if not (folder / f"pairs_{i:05d}.npy").is_file()]
    if missing:
        raise FileNotFoundError(f"search parts missing for tasks {missing[:10]} ({len(missing)} in all)")
    emb_dir = resolve_path(workdir, cfg.embeddings)

    def compute(out: Path) -> dict[str, Any]:
        paths = LineFile(emb_dir / "paths.txt")  # only the reported and skipped rows are read
        if len(paths) != emb_io.read_meta(emb_dir)["count"]:
            raise ValueError(f"{emb_dir}/paths.txt does not match meta.json")
        pool = np.load(folder / "pool.npy")
        local = merge_pairs(np.concatenate([np.load(folder / f"pairs_{i:05d}.npy") for i in range(plan["num_shards"])]))
        i, j = local["i"], local["j"]
        labels = components(len(pool), i, j)
        sub = ShardedRows(emb_dir, pool) if d.keep == "centroid" else None
        scores = None
        if d.keep == "score":
            scores = np.load(resolve_path(workdir, d.score_file))[pool]
        keep_local = select_keep(labels, d.keep, d.seed, pairs=(i, j), emb=sub, scores=scores)
        check_removed_fraction(
            "dedup", len(pool), len(keep_local), d.max_removed_fraction, force, f"threshold {d.threshold}"
        )
        pairs = np.empty(len(local), dtype=PAIR_DTYPE)
        pairs["i"], pairs["j"], pairs["sim"] = pool[i], pool[j], local["sim"]
        global_labels = np.full(len(paths), -1, dtype=np.int64)
        global_labels[pool] = labels
        skipped = np.setdiff1d(np.arange(len(paths)), pool)
        save_npy(out / "pairs.npy", pairs)
        save_npy(out / "labels.npy", global_labels)
        save_npy(out / "kept.npy", pool[keep_local])
        write_lines(out / "skipped.txt", (paths[r] for r in skipped))
        report = components_report(labels, keep_local, _Subset(paths, pool), d.report_top, d.report_members)
        report = {**dedup_report(d, len(i), len(skipped), emb_dir, report), "search_tasks": plan["num_shards"]}
        write_json(out / "components.json", report)
        return {**{k: v for k, v in report.items() if k != "largest_components"}, **funnel(len(pool), len(keep_local))}

    return run_stage(workdir, "dedup", fp, compute, force)


def run_sharded_dedup(
    workdir: str | Path,
    cfg: CurationConfig,
    num_shards: int,
    executor_options: Mapping[str, Any] | None = None,
    force: bool = False,
    rescore_margin: float = 0.0,
) -> dict[str, Any]:
    """prepare → ``num_shards`` search tasks (array job) → merge; blocks until the tasks finish."""
    prepare_search(workdir, cfg, num_shards, rescore_margin)
    wait_all(submit_array("dedup-search", workdir, cfg, num_shards, executor_options, force=force))
    return merge_search(workdir, cfg, force)
