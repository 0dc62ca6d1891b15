"""Curation at scale on synthetic embeddings: dedup, retrieval and 2-level k-means, timed per stage.

::

    python benchmarks/curation.py                      # 1 M x 384 float16 rows (a few minutes on 2 cores)
    python benchmarks/curation.py --rows 20000         # a smoke run (seconds)
    python benchmarks/curation.py --nlist 4096 --nprobe 8 --k 32 --json out.json
    python benchmarks/curation.py --rows 0 --embed-images 512   # decode + embed-stage throughput only

The data: ``rows`` unit vectors around ``rows / 1000`` cluster centres (Zipf-like sizes, cosine
similarity about 0.5 inside a cluster, about 0 across), stored float16 like the embed stage writes
them, with ``dup_fraction`` of the rows replaced by near-copies (cosine about 0.95) of other rows.

Stages, each through the ``data_curation`` functions the pipeline runs:

* ``dedup``: IVF index build + self k-NN search (``k`` + 1 neighbours, ``nprobe`` lists) + pairs above
  ``threshold`` + connected components + keep rule — recall/precision of the planted pairs printed;
* ``retrieval``: ``queries`` new points drawn around 10 clusters, ``retrieval_k`` neighbours each, on
  an IVF index built once (build timed on its own row);
* ``k-means L1`` / ``L2``: hierarchical k-means (``kmeans`` clusters per level, faiss, kmeans++).

With ``--embed-images N`` it first times JPEG decoding + resizing on one core and the ``embed`` stage
itself (a randomly initialised ``--embed-arch`` export: throughput does not depend on the weights)
on ``N`` synthetic 500x375 JPEGs, on the CPU and on a GPU when one is visible.

Peak RSS is the process's high-water mark during the stage (reset between stages through
``/proc/self/clear_refs`` on Linux; elsewhere the high-water mark since the start). On a CUDA
machine the dedup and retrieval searches run again on the GPU: faiss-gpu when installed, else the
exact torch matmul index (``index.backend=torch``); k-means on GPU needs faiss-gpu.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from data_curation.config import CurationConfig, IndexConfig  # noqa: E402
from data_curation.dedup import components, find_duplicate_pairs, select_keep  # noqa: E402
from data_curation.embed import run_embed  # noqa: E402
from data_curation.index import build_index, faiss_gpu_available, index_from_config, search  # noqa: E402
from data_curation.kmeans import hierarchical_kmeans  # noqa: E402
from dinov2.config import Config, ModelConfig  # noqa: E402


@dataclass
class Row:
    stage: str
    device: str
    rows: int
    seconds: float
    peak_rss_gb: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


# ------------------------------------------------------------------------------------------- memory
def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(rows: list[Row], stage: str, device: str, n: int, fn: Callable[[], Any], note: str = "") -> Any:
    _reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    rows.append(Row(stage, device, n, seconds, _peak_rss_gb(), note))
    print(f"  {stage:<28} {device:<5} {seconds:9.2f} s  {note}", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------- data
def synthetic(rows: int, dim: int, dup_fraction: float, seed: int, chunk: int = 65536):
    """(x float16 (rows, dim), centres, cluster of each row, planted pairs (orig, copy))."""
    rng = np.random.default_rng(seed)
    n_centres = max(10, rows // 1000)
    centres = rng.standard_normal((n_centres, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    p = 1.0 / np.arange(1, n_centres + 1) ** 0.5  # Zipf-like cluster sizes
    p /= p.sum()
    labels = rng.choice(n_centres, size=rows, p=p)
    spread = 1.0 / np.sqrt(dim)  # |noise|^2 ~ 1: cosine ~ 0.5 inside a cluster
    x = np.empty((rows, dim), dtype=np.float16)
    for s in range(0, rows, chunk):
        block = centres[labels[s : s + chunk]] + spread * rng.standard_normal(
            (len(labels[s : s + chunk]), dim), dtype=np.float32
        )
        x[s : s + chunk] = block / np.linalg.norm(block, axis=1, keepdims=True)
    n_dup = int(rows * dup_fraction)
    copies = rng.choice(rows, size=n_dup, replace=False)
    pool = np.setdiff1d(np.arange(rows), copies)
    originals = rng.choice(pool, size=n_dup, replace=False)
    noisy = x[originals].astype(np.float32) + 0.23 * spread * rng.standard_normal((n_dup, dim), dtype=np.float32)
    x[copies] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)  # cosine ~ 0.95 to the original
    labels[copies] = labels[originals]
    pairs = np.stack([np.minimum(originals, copies), np.maximum(originals, copies)], axis=1)
    return x, centres, labels, pairs


def queries_near(centres: np.ndarray, n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    chosen = rng.choice(len(centres), size=min(n_classes, len(centres)), replace=False)
    q_labels = rng.choice(chosen, size=n)
    q = centres[q_labels] + rng.standard_normal((n, centres.shape[1]), dtype=np.float32) / np.sqrt(centres.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32), q_labels


# ------------------------------------------------------------------------------------------- stages
def pair_scores(found_i: np.ndarray, found_j: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of the found pairs against the planted ones."""
    if len(truth) == 0:
        return 1.0, 1.0
    n = int(max(truth.max(), found_j.max() if len(found_j) else 0)) + 1
    key_found = found_i.astype(np.int64) * n + found_j
    key_truth = truth[:, 0].astype(np.int64) * n + truth[:, 1]
    hit = np.isin(key_found, key_truth).sum()
    return hit / max(len(key_found), 1), np.isin(key_truth, key_found).mean()


def run(args: argparse.Namespace) -> list[Row]:
    table: list[Row] = []
    args.summary = {}
    if args.embed_images:
        args.summary.update(run_embed_bench(args, table))
    if args.rows:
        args.summary.update(run_search(args, table))
    print(json.dumps(args.summary), file=sys.stderr)
    return table


def run_search(args: argparse.Namespace, table: list[Row]) -> dict[str, Any]:
    """dedup, retrieval and 2-level k-means on synthetic embeddings (module docstring)."""
    import faiss  # optional dependency (extra `curation`)

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(
        f"curation benchmark: {args.rows} x {args.dim} float16, faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} threads",
        file=sys.stderr,
    )
    x, centres, labels, truth = timed(
        table, "generate data", "cpu", args.rows, lambda: synthetic(args.rows, args.dim, args.dup_fraction, args.seed)
    )
    nlist = args.nlist or max(16, min(4096, int(np.sqrt(args.rows))))
    ivf = IndexConfig(
        kind=args.kind, nlist=nlist, nprobe=args.nprobe, train_size=args.train_size, pq_m=args.pq_m, use_gpu="false"
    )
    ivf_note = f"{args.kind.upper()} nlist={nlist} nprobe={args.nprobe}" + (
        f" pq_m={args.pq_m or args.dim // 8}" if args.kind == "ivfpq" else ""
    )

    # dedup: index + self k-NN + pairs, then components and the keep rule
    def dedup_knn():
        return find_duplicate_pairs(x, k=args.k, threshold=args.threshold, index_cfg=ivf, batch_size=16384)

    i, j, _ = timed(table, "dedup: index + k-NN pairs", "cpu", args.rows, dedup_knn, f"{ivf_note} k={args.k}")
    kept = timed(
        table, "dedup: components + keep", "cpu", args.rows, lambda: select_keep(components(args.rows, i, j), "first")
    )
    precision, recall = pair_scores(i, j, truth)
    summary = {
        "dedup_pairs": len(i),
        "planted": len(truth),
        "kept": len(kept),
        "pair_precision": round(float(precision), 4),
        "pair_recall": round(float(recall), 4),
    }

    # retrieval: one index, queries around 10 clusters
    queries, q_labels = queries_near(centres, args.queries, 10, args.seed)
    index = timed(
        table,
        "retrieval: index build",
        "cpu",
        args.rows,
        lambda: build_index(
            x,
            kind=args.kind,
            nlist=nlist,
            nprobe=args.nprobe,
            train_size=args.train_size,
            pq_m=args.pq_m,
            use_gpu="false",
        ),
        ivf_note,
    )
    _, ids = timed(
        table,
        "retrieval: search",
        "cpu",
        args.queries,
        lambda: search(index, queries, args.retrieval_k),
        f"k={args.retrieval_k}",
    )
    summary["retrieval_precision"] = round(float((labels[ids] == q_labels[:, None]).mean()), 4)
    index = None  # free the index before k-means

    # 2-level k-means, timed per level
    k1 = args.kmeans[0] or max(10, args.rows // 1000)
    k2 = args.kmeans[1] if len(args.kmeans) > 1 and args.kmeans[1] else max(2, k1 // 10)
    ends = [time.perf_counter()]

    def level_done(level: int, _: Any) -> None:
        ends.append(time.perf_counter())
        rows = args.rows if level == 1 else k1
        table.append(
            Row(
                f"k-means L{level} (k={[k1, k2][level - 1]})",
                "cpu",
                rows,
                ends[-1] - ends[-2],
                _peak_rss_gb(),
                f"niter={args.niter}",
            )
        )
        print(f"  k-means level {level}: {ends[-1] - ends[-2]:.2f} s", file=sys.stderr, flush=True)
        _reset_peak_rss()

    _reset_peak_rss()
    hierarchical_kmeans(x, [k1, k2], niter=args.niter, seed=args.seed, use_gpu="false", on_level=level_done)

    if args.device in ("auto", "cuda"):
        summary.update(run_gpu(args, table, x, queries, truth, ivf))
    return summary


def run_gpu(args, table, x, queries, truth, ivf) -> dict[str, Any]:
    """The searches again on a GPU: faiss-gpu when present, else the exact torch matmul index."""
    try:
        import torch  # lazy: torch (~2 s); --help stays fast
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("--device cuda: no CUDA device")
        return {}
    if faiss_gpu_available():
        cfg, note = replace(ivf, use_gpu="true"), f"faiss-gpu IVF nlist={ivf.nlist} nprobe={ivf.nprobe}"
    else:
        cfg, note = replace(ivf, backend="torch", torch_device="cuda"), "torch exact matmul (no faiss-gpu)"

    def dedup():
        out = find_duplicate_pairs(x, k=args.k, threshold=args.threshold, index_cfg=cfg, batch_size=16384)
        torch.cuda.synchronize()
        return out

    i, j, _ = timed(table, "dedup: index + k-NN pairs", "cuda", args.rows, dedup, f"{note} k={args.k}")
    index = timed(table, "retrieval: index build", "cuda", args.rows, lambda: index_from_config(x, cfg), note)
    timed(
        table,
        "retrieval: search",
        "cuda",
        args.queries,
        lambda: search(index, queries, args.retrieval_k),
        f"k={args.retrieval_k}",
    )
    precision, recall = pair_scores(i, j, truth)
    return {"gpu_pair_precision": round(float(precision), 4), "gpu_pair_recall": round(float(recall), 4)}


# -------------------------------------------------------------------------------------------- embed
def synthetic_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    """``n`` JPEG files (quality 90) of smooth random images, ImageNet-like in size and byte count."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    blobs = []
    for _ in range(min(n, 32)):  # 32 distinct images, repeated: decoding cost is what matters
        coarse = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        fine = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3)), 0, 255)
        path = folder / f"src_{len(blobs):02d}.jpg"
        Image.fromarray(fine.astype(np.uint8)).save(path, quality=90)
        blobs.append(path.read_bytes())
        path.unlink()
    paths = [folder / f"img_{i:07d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        path.write_bytes(blobs[i % len(blobs)])
    return paths


def run_embed_bench(args: argparse.Namespace, table: list[Row]) -> dict[str, Any]:
    """Decode-only throughput on one core, then the embed stage with a random ``--embed-arch`` export."""
    import torch  # lazy: torch (~2 s); --help stays fast

    from dinov2.data.decode import decode_image
    from dinov2.eval import save_backbone
    from dinov2.eval.features import eval_transform
    from dinov2.models import build_backbone

    n, crop = args.embed_images, args.embed_crop
    with tempfile.TemporaryDirectory(prefix="curation-bench-") as tmp:
        tmp = Path(tmp)
        paths = synthetic_jpegs(tmp / "images", n, (500, 375), args.seed)
        mean_kb = np.mean([p.stat().st_size for p in paths[:32]]) / 1024
        transform = eval_transform(resize=crop, crop=crop)
        timed(
            table,
            "decode + resize (1 core)",
            "cpu",
            n,
            lambda: [transform(decode_image(p)) for p in paths],
            f"500x375 JPEG q90 ({mean_kb:.0f} KB) -> {crop}",
        )
        cfg = Config()
        cfg.model = ModelConfig(arch=args.embed_arch, patch_size=14, img_size=crop)
        cfg.data.crops.global_crops_size = crop
        save_backbone(build_backbone(cfg.model), cfg, tmp / "run", "teacher_backbone.safetensors")
        devices = ["cpu"] + (["cuda"] if args.device in ("auto", "cuda") and torch.cuda.is_available() else [])
        out = {}
        for device in devices:
            ccfg = CurationConfig(progress=False, embeddings=f"emb_{device}")
            e = ccfg.embed
            e.input.path, e.model.path = str(tmp / "images"), str(tmp / "run")
            e.device, e.batch_size, e.num_workers = device, args.embed_batch, args.embed_workers
            e.shard_size = max(1, n // 2)
            summary = run_embed(tmp, ccfg)
            stats = [json.loads(f.read_text()) for f in sorted((tmp / f"emb_{device}").glob("stats_*.json"))]
            seconds = sum(st["seconds"] for st in stats)
            note = f"{args.embed_arch}/14 @{crop}, batch {e.batch_size}, {e.num_workers} workers"
            if device == "cuda":
                note += ", bf16 autocast"
            table.append(Row("embed stage", device, summary["count"], seconds, _peak_rss_gb(), note))
            out[f"embed_{device}_images_per_s"] = round(summary["count"] / seconds, 1)
            print(f"  embed {device}: {seconds:.2f} s for {summary['count']} images", file=sys.stderr, flush=True)
    return out


def format_table(table: Sequence[Row]) -> str:
    head = f"| {'stage':<28} | {'device':<6} | {'rows':>9} | {'seconds':>8} | {'rows/s':>10} | {'peak RSS':>8} | notes"
    lines = [
        head,
        "|" + "-" * 30 + "|" + "-" * 8 + "|" + "-" * 11 + "|" + "-" * 10 + "|" + "-" * 12 + "|" + "-" * 10 + "|------",
    ]
    for r in table:
        lines.append(
            f"| {r.stage:<28} | {r.device:<6} | {r.rows:>9,} | {r.seconds:>8.2f} | {r.rate:>10,.0f} | "
            f"{r.peak_rss_gb:>6.2f} G | {r.note}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--dup-fraction", type=float, default=0.01, help="rows replaced by near-copies")
    parser.add_argument("--k", type=int, default=16, help="dedup neighbours per row (the pipeline default is 64)")
    parser.add_argument("--threshold", type=float, default=0.85, help="dedup cosine threshold")
    parser.add_argument("--kind", choices=("ivf", "ivfpq", "flat"), default="ivf", help="index of dedup/retrieval")
    parser.add_argument("--pq-m", type=int, default=0, help="ivfpq: bytes per vector (0: dim / 8)")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: sqrt(rows), at most 4096)")
    parser.add_argument("--nprobe", type=int, default=2, help="IVF lists searched per query")
    parser.add_argument("--train-size", type=int, default=0, help="IVF training rows (0: 64 x nlist)")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--retrieval-k", type=int, default=10)
    parser.add_argument(
        "--kmeans", type=int, nargs="+", default=[0, 0], help="clusters of level 1 and 2 (0: rows/1000 and level-1/10)"
    )
    parser.add_argument("--niter", type=int, default=10, help="k-means iterations per level")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: also time the searches on a GPU when one is visible",
    )
    parser.add_argument(
        "--embed-images", type=int, default=0, help="also time decoding and the embed stage on this many JPEGs"
    )
    parser.add_argument("--embed-arch", default="vit_small", help="embed: backbone arch (random weights, patch 14)")
    parser.add_argument("--embed-crop", type=int, default=224)
    parser.add_argument("--embed-batch", type=int, default=64)
    parser.add_argument("--embed-workers", type=int, default=0, help="embed: DataLoader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the table and summary here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    table = run(args)
    print(format_table(table))
    print(json.dumps(args.summary))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "args": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "summary"
                    },
                    "summary": args.summary,
                    "table": [{**r.__dict__, "rows_per_s": r.rate} for r in table],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spin-waiting on a shared, busy machine
    sys.exit(main())
