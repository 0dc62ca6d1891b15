"""Copy detection on real photos: a copy detector trained on the pool vs DINO features vs a classical descriptor.

The planted set: ``--originals`` CIFAR-10 test photos outside cifar10-small (neither the CPU test model
nor a 50k-train GPU run sees them) written as files into one folder, plus one near-copy each of
``--copies`` of them, made with the transforms ``dinov2-curate calibrate`` uses (its default strengths;
kinds crop, flip, jpeg, jitter, rotate, overlay, combo in turn; another seed than calibrate's), all under
shuffled names. For each descriptor the table gives

* **best F1** over every pair of images (the oracle threshold, and its precision / recall);
* **calibrated**: the threshold ``dinov2-curate calibrate`` picks for a target precision of 0.95 — it
  plants *its own* copies of random pool images, not the evaluation copies — and the precision / recall
  of the evaluation copies at that threshold, with the recall per kind.

Descriptors: ``tiny image`` (8×8 mean-centred colour thumbnail, averaged with its mirror image: the
classical baseline; calibrated with calibrate's own estimator on copies it plants the same way),
``dino`` (``--dino RUN_DIR``: CLS of one of our DINO runs, flip-averaged), ``copy detector``
(``--copy RUN_DIR``, or trained here on the pool itself with ``--train-iterations``:
``configs/train/copy_detection.yaml`` on a small ViT, flip-averaged).

    python benchmarks/copy_detection.py --dino outputs/cifar10_gpu --train-iterations 3000 --device cuda
    python benchmarks/copy_detection.py --tiny      # 400 photos + 80 copies, 200 steps: ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.tables import format_table  # noqa: E402
from data_curation import embeddings as emb_io  # noqa: E402
from data_curation.calibrate import GRID, choose_threshold, dedup_curve  # noqa: E402
from data_curation.cli import main as curate  # noqa: E402
from data_curation.config import CalibrateConfig  # noqa: E402
from data_curation.workdir import read_done  # noqa: E402
from dinov2.config import CopyAugmentConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("DINOV2_SHARED_DATA", REPO.parent / "shared" / "data"))
KINDS = ("crop", "flip", "jpeg", "jitter", "rotate", "overlay", "combo")
COLUMNS = ["descriptor", "train s", "best F1", "P / R at best", "calibrated t", "P / R calibrated", "recall per kind"]
TINY_VIT = [  # the CPU-minutes ViT of the test suite (tests/configs/cifar10_small_cpu.yaml): 24 px views,
    # batches of 64 and a higher lr for a run of a few hundred steps
    "model.arch=vit_small",
    "model.embed_dim=96",
    "model.depth=4",
    "model.num_heads=3",
    "model.patch_size=4",
    "model.img_size=32",
    "model.layerscale_init=0.1",
    "data.crops.global_crops_size=24",
    "data.crops.mean=[0.4914,0.4822,0.4465]",
    "data.crops.std=[0.247,0.2435,0.2616]",
    "optim.base_lr=0.006",
]


# ------------------------------------------------------------------------------------ planted set
def unseen_test_images(data: Path) -> np.ndarray:
    """CIFAR-10 test indices outside cifar10-small's test split."""
    n = len(np.load(data / "cifar10" / "test_jpeg_offsets.npy")) - 1
    return np.setdiff1d(np.arange(n), np.load(data / "cifar10-small" / "test_idx.npy"))


def build_pool(data: Path, folder: Path, n_originals: int, n_copies: int, seed: int = 1) -> dict[tuple[str, str], str]:
    """Write the planted set into ``folder``; return ``{(name, name): kind}`` of the planted pairs."""
    from dinov2.data.copy_augmentations import make_copy  # lazy: torch (~2 s); --help stays fast

    blob = np.load(data / "cifar10" / "test_jpeg.npy", mmap_mode="r")
    offsets = np.load(data / "cifar10" / "test_jpeg_offsets.npy")
    rng = np.random.default_rng(seed)
    originals = rng.choice(unseen_test_images(data), size=n_originals, replace=False)
    copied = rng.choice(n_originals, size=n_copies, replace=False)
    names = [f"img_{n:05d}" for n in rng.permutation(n_originals + n_copies)]
    folder.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(originals):
        (folder / f"{names[k]}.jpg").write_bytes(blob[offsets[i] : offsets[i + 1]].tobytes())
    truth, transforms = {}, CopyAugmentConfig()
    for c, k in enumerate(copied):
        i = originals[k]
        image = Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")
        kind = KINDS[c % len(KINDS)]
        name = f"{names[n_originals + c]}.png"  # lossless: the copy is exactly what the transform made
        make_copy(image, kind, transforms, rng).save(folder / name)
        truth[tuple(sorted((f"{names[k]}.jpg", name)))] = kind
    return truth


# ------------------------------------------------------------------------------------ scoring
def pair_similarities(x: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) with cosine above ``floor``: (i, j, sim)."""
    sims = x @ x.T
    i, j = np.triu_indices(len(x), k=1)
    s = sims[i, j]
    keep = s > floor
    return i[keep], j[keep], s[keep]


def evaluate(x: np.ndarray, names: list[str], truth: dict[tuple[str, str], str], threshold: float | None) -> dict:
    """Best F1 over thresholds, and precision / recall (overall and per kind) at ``threshold``."""
    position = {n: r for r, n in enumerate(names)}
    truth_rows = {tuple(sorted((position[a], position[b]))): kind for (a, b), kind in truth.items()}
    true_sims = np.array([float(x[a] @ x[b]) for a, b in truth_rows])
    floor = min(float(true_sims.min()), threshold if threshold is not None else 1.0) - 1e-6
    i, j, s = pair_similarities(x, floor)
    is_true = np.array([(a, b) in truth_rows for a, b in zip(i.tolist(), j.tolist())], dtype=bool)
    order = np.argsort(-s)
    hits = np.cumsum(is_true[order])
    found = np.arange(1, len(order) + 1)
    precision, recall = hits / found, hits / len(truth_rows)
    f1 = np.where(hits > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(np.argmax(f1))
    out = {
        "best_f1": float(f1[best]),
        "best_threshold": float(s[order][best]),
        "best_precision": float(precision[best]),
        "best_recall": float(recall[best]),
    }
    if threshold is not None:
        above = s > threshold
        n_found, n_hit = int(above.sum()), int((above & is_true).sum())
        kinds = np.array(list(truth_rows.values()))
        out.update(
            {
                "threshold": threshold,
                "precision": n_hit / n_found if n_found else None,
                "recall": n_hit / len(truth_rows),
                "pairs_found": n_found,
                "recall_per_kind": {
                    k: float((true_sims[kinds == k] > threshold).mean()) for k in KINDS if (kinds == k).any()
                },
            }
        )
    return out


def load_image(path: Path) -> Any:
    """An RGB PIL image, read fully (the file is closed)."""
    from dinov2.data.decode import decode_image  # lazy: torch (~2 s); --help stays fast

    return decode_image(path)


def tiny_image(images: list[Any], size: int = 8) -> np.ndarray:
    """The classical baseline: ``size``² colour thumbnail, mean-centred, averaged with its mirror, L2-normalised."""

    def one(image: Any) -> np.ndarray:
        a = np.asarray(image.convert("RGB").resize((size, size), Image.BOX), dtype=np.float32) / 255.0
        a = (a + a[:, ::-1]) / 2
        a = (a - a.mean()).ravel()
        return a / max(float(np.linalg.norm(a)), 1e-6)

    return np.stack([one(im) for im in images]).astype(np.float32)


def classical_calibration(images: list[Any], x: np.ndarray, target: float = 0.95, seed: int = 0) -> float | None:
    """The tiny-image threshold, chosen as ``calibrate`` chooses (same planting, estimator and rule)."""
    from dinov2.data.copy_augmentations import make_copy  # lazy: torch (~2 s); --help stays fast

    c = CalibrateConfig()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(images), size=min(c.n_samples, len(images)), replace=False))
    copy_rng = np.random.default_rng(seed + 1)
    y = tiny_image(
        [make_copy(images[r], list(c.kinds)[n % len(c.kinds)], c.transforms, copy_rng) for n, r in enumerate(rows)]
    )
    sims = y @ x.T
    sims[np.arange(len(rows)), rows] = -np.inf  # the original is not a negative
    nearest = np.argsort(-sims, axis=1)[:, : c.k]
    to_copy = np.take_along_axis(sims, nearest, axis=1)
    to_original = np.einsum("nd,nkd->nk", x[rows], x[nearest])
    positive = np.einsum("nd,nd->n", y, x[rows])
    chosen = choose_threshold(dedup_curve(positive, to_copy, to_original, c.duplicate_fraction), target)
    return None if chosen is None else float(GRID[chosen])


# ------------------------------------------------------------------------------------ models
def train_copy_detector(folder: Path, out: Path, iterations: int, batch: int, device: str, tiny: bool) -> Path:
    """``configs/train/copy_detection.yaml`` on the unlabelled pool folder, with the trainer; returns the run dir."""
    from dinov2.launch.run import train  # lazy: torch (~2 s); --help stays fast

    overrides = [
        "data.dataset.kind=folder",
        f"data.dataset.path={folder}",
        f"data.batch_size_per_gpu={batch}",
        f"data.num_workers={1 if tiny else 6}",
        f"train.output_dir={out}",
        f"train.max_iterations={iterations}",
        "optim.epochs=1",
        f"optim.epoch_length={iterations}",
        "optim.warmup_epochs=0.1",
        f"train.checkpoint_every={iterations}",
        "train.progress=false",
        "train.tensorboard=false",
        f"train.device={device}",
        *TINY_VIT,
    ]
    train(load_config(REPO / "configs" / "train" / "copy_detection.yaml", overrides))
    return out


def training_seconds(run_dir: Path) -> float:
    """Wall seconds of the training steps of a run (from metrics.jsonl: images per step / images_per_s)."""
    cfg = load_config(run_dir / "config.yaml")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float(sum(cfg.data.batch_size_per_gpu / r["images_per_s"] for r in records if r.get("images_per_s")))


def embed_and_calibrate(
    folder: Path, workdir: Path, run_dir: Path, device: str, progress: bool
) -> tuple[np.ndarray, list[str], dict]:
    """``dinov2-curate embed,calibrate`` of the pool with our run ``run_dir`` (flip-averaged CLS)."""
    argv = [
        "embed,calibrate",
        "--workdir",
        str(workdir),
        f"progress={str(progress).lower()}",
        f"embed.input.path={folder}",
        f"embed.model.path={run_dir}",
        "embed.flip_average=true",
        f"embed.device={device}",
    ]
    if curate(argv) != 0:
        raise RuntimeError(f"dinov2-curate {' '.join(argv)} failed")
    x, paths = emb_io.load_embeddings(workdir / "embeddings")
    return (
        np.asarray(x, dtype=np.float32),
        [os.path.basename(p) for p in paths],
        read_done(workdir, "calibrate")["summary"],
    )


def row(name: str, seconds: float | None, result: dict) -> list[Any]:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    per_kind = " ".join(f"{k} {v:.2f}" for k, v in result.get("recall_per_kind", {}).items())
    return [
        name,
        None if seconds is None else round(seconds),
        f"{result['best_f1']:.3f}",
        f"{result['best_precision']:.2f} / {result['best_recall']:.2f} @ {result['best_threshold']:.3f}",
        fmt(result.get("threshold")),
        f"{fmt(result.get('precision'))} / {fmt(result.get('recall'))}"
        if result.get("threshold") is not None
        else "none reaches 0.95",
        per_kind or "-",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (cifar10/, cifar10-small/)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/copy_detection_bench"))
    p.add_argument("--originals", type=int, default=2000)
    p.add_argument("--copies", type=int, default=300)
    p.add_argument("--dino", type=Path, default=None, help="a DINO run dir of ours (config.yaml + teacher weights)")
    p.add_argument("--copy", type=Path, default=None, help="a trained copy-detection run dir (else trained here)")
    p.add_argument(
        "--train-iterations", type=int, default=0, help="train a copy detector on the pool for this many steps"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="400 photos + 80 copies, 200 training steps")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.tiny:
        args.originals, args.copies = 400, 80
        args.train_iterations = args.train_iterations or 200
    out = args.output_dir
    folder = out / "pool"
    truth = build_pool(args.data, folder, args.originals, args.copies)
    names = sorted(p.name for p in folder.iterdir())
    images = [load_image(folder / n) for n in names]
    results: dict[str, Any] = {"n_originals": args.originals, "n_copies": args.copies}
    rows = []

    x = tiny_image(images)
    result = evaluate(x, names, truth, classical_calibration(images, x))
    results["tiny image"] = result
    rows.append(row("tiny image (8x8, classical)", 0.0, result))

    if args.dino is not None:
        x, emb_names, calib = embed_and_calibrate(folder, out / "work_dino", args.dino, args.device, not args.tiny)
        result = evaluate(x, emb_names, truth, calib["dedup"]["threshold"])
        results["dino"] = {**result, "train_seconds": training_seconds(args.dino)}
        rows.append(row(f"dino ({args.dino.name})", results["dino"]["train_seconds"], result))

    copy_run = args.copy
    if copy_run is None and args.train_iterations:
        t0 = time.perf_counter()
        copy_run = train_copy_detector(
            folder, out / "copy_run", args.train_iterations, args.batch_size, args.device, args.tiny
        )
        results["copy_train_wall_seconds"] = time.perf_counter() - t0
    if copy_run is not None:
        x, emb_names, calib = embed_and_calibrate(folder, out / "work_copy", copy_run, args.device, not args.tiny)
        result = evaluate(x, emb_names, truth, calib["dedup"]["threshold"])
        results["copy"] = {**result, "train_seconds": training_seconds(copy_run)}
        rows.append(row("copy detector (trained on the pool)", results["copy"]["train_seconds"], result))

    kinds = ", ".join(KINDS)
    print(f"\ncopy detection: {args.originals} unseen CIFAR-10 test photos + {args.copies} planted copies ({kinds})")
    print(format_table(COLUMNS, rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


if __name__ == "__main__":
    main()
