"""Curation end to end on real CIFAR-10 images, embedded by a ViT pretrained with our trainer.

* Copy detection: 2000 CIFAR-10 test-split images outside cifar10-small's test split, which no
  model here trains on (the CPU fixture trains on cifar10-small train, a GPU run of
  ``benchmarks/cifar10_knn.py`` on the 50k train images), plus near-duplicates of 200 of them — a
  random resized crop keeping at least 60 % of the area, a horizontal flip half of the time, mild
  colour jitter and a JPEG re-encode at quality 30 — all written as files in one folder;
  ``dinov2-curate embed,dedup`` must find the planted pairs with precision and recall of at least
  0.9. Each image is embedded as the mean of its
  and its mirror image's features (``embed.flip_average``), so flips cost nothing. The similarity
  threshold is chosen on a disjoint calibration set built the same way (1000 originals, 100 copies).
* Retrieval: the cifar10-small test images of one class as queries against the cifar10-small train
  split (blobs + subset files); precision@k of the class must be far above the 10 % chance level.

Needs ``../shared/data`` and the session fixture ``curation_model`` (tests/conftest.py): the CPU
fixture model, or the run dir in ``DINOV2_CURATION_MODEL``, e.g. after

    python benchmarks/cifar10_knn.py --budget-min 5 --save-run outputs/cifar10_gpu   # on a GPU
    DINOV2_CURATION_MODEL=outputs/cifar10_gpu pytest tests/test_curation_e2e.py
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageEnhance

pytest.importorskip("faiss")
from conftest import uses_cpu_fixture_model  # noqa: E402

from data_curation import embeddings as emb_io  # noqa: E402
from data_curation.cli import main  # noqa: E402

N_ORIGINALS = 2000
N_COPIES = 200
N_CALIBRATION = 1000  # other originals (+ 100 copies) on which the dedup threshold is chosen
QUERY_CLASS = 8  # ship
RETRIEVAL_K = 10
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def near_copy(image: Image.Image, rng: np.random.Generator) -> bytes:
    """A random resized crop (>= 60 % of the area), maybe flipped, mildly jittered, JPEG quality 30."""
    w, h = image.size
    for _ in range(20):
        area = rng.uniform(0.6, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = w, h
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    copy = image.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        copy = copy.transpose(Image.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        copy = enhancer(copy).enhance(rng.uniform(0.9, 1.1))
    out = io.BytesIO()
    copy.save(out, format="JPEG", quality=30)
    return out.getvalue()


def plant(folder, blob, offsets, originals, n_copies, rng) -> set:
    """Write ``originals`` (their stored JPEG bytes) and near-copies of ``n_copies`` of them into
    ``folder`` under shuffled names; return the planted (name, name) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    copied = rng.choice(len(originals), size=n_copies, replace=False)
    names = [f"img_{n:05d}.jpg" for n in rng.permutation(len(originals) + n_copies)]
    for k, i in enumerate(originals):
        (folder / names[k]).write_bytes(blob[offsets[i] : offsets[i + 1]].tobytes())
    truth = set()
    for c, k in enumerate(copied):
        i = originals[k]
        image = Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")
        (folder / names[len(originals) + c]).write_bytes(near_copy(image, rng))
        truth.add(tuple(sorted((names[k], names[len(originals) + c]))))
    return truth


@pytest.fixture(scope="module")
def planted(shared_data, tmp_path_factory):
    """Two folders of CIFAR-10 test images never trained on (outside cifar10-small's test split), each
    with planted near-copies: a calibration set (threshold) and the evaluation pool (disjoint)."""
    full = shared_data / "cifar10"
    blob = np.load(full / "test_jpeg.npy", mmap_mode="r")
    offsets = np.load(full / "test_jpeg_offsets.npy")
    unseen = np.setdiff1d(np.arange(len(offsets) - 1), np.load(shared_data / "cifar10-small" / "test_idx.npy"))
    rng = np.random.default_rng(0)
    chosen = rng.choice(unseen, size=N_ORIGINALS + N_CALIBRATION, replace=False)
    root = tmp_path_factory.mktemp("planted")
    pool_truth = plant(root / "pool", blob, offsets, chosen[:N_ORIGINALS], N_COPIES, rng)
    cal_truth = plant(root / "calibration", blob, offsets, chosen[N_ORIGINALS:], N_CALIBRATION // 10, rng)
    return {"pool": (root / "pool", pool_truth), "calibration": (root / "calibration", cal_truth)}


def pair_precision_recall(found: set, truth: set) -> tuple[float, float]:
    hits = len(found & truth)
    return hits / max(len(found), 1), hits / len(truth)


def embed(folder, workdir, run_dir, extra=()) -> tuple[np.ndarray, list[str]]:
    argv = [
        "embed",
        "--workdir",
        str(workdir),
        "progress=false",
        f"embed.input.path={folder}",
        f"embed.model.path={run_dir}",
        "embed.shard_size=1000",
        *extra,
    ]
    assert main(argv) == 0
    x, paths = emb_io.load_embeddings(workdir / "embeddings")
    return x, [os.path.basename(p) for p in paths]


def all_pairs_curve(x, names, truth, thresholds) -> list[tuple[float, float, float, int]]:
    """(threshold, precision, recall, pairs) over every pair of rows (no k-NN limit)."""
    sims = x @ x.T
    iu, ju = np.triu_indices(len(x), k=1)
    s = sims[iu, ju]
    keep = s > min(thresholds)
    iu, ju, s = iu[keep], ju[keep], s[keep]
    curve = []
    for t in thresholds:
        above = np.flatnonzero(s > t)
        p, r = pair_precision_recall({tuple(sorted((names[iu[a]], names[ju[a]]))) for a in above}, truth)
        curve.append((float(t), p, r, len(above)))
    return curve


CPU_MODEL_XFAIL = (
    "the CPU-minutes fixture model (34% k-NN) has not learned crop invariance: measured P 0.19 / R 0.31 "
    "at the calibrated threshold; needs a longer-trained (GPU) model, see DINOV2_CURATION_MODEL in "
    "docs/curation.md. Numbers are printed either way."
)


def test_dedup_finds_planted_near_duplicates(planted, curation_model, tmp_path, capsys, request):
    """The threshold is calibrated on the calibration set (the model comes from a recipe that may
    change), then ``embed,dedup`` runs on the evaluation pool with it. Expected to fail with the CPU
    fixture model; strict with a model given by ``DINOV2_CURATION_MODEL``."""
    if uses_cpu_fixture_model():
        request.applymarker(pytest.mark.xfail(reason=CPU_MODEL_XFAIL, raises=AssertionError, strict=True))
    cal_folder, cal_truth = planted["calibration"]
    flip = ["embed.flip_average=true"]
    x_cal, cal_names = embed(cal_folder, tmp_path / "calibration", curation_model.run_dir, flip)
    grid = np.round(np.arange(0.3, 0.996, 0.005), 3)
    cal_curve = all_pairs_curve(x_cal, cal_names, cal_truth, grid)
    threshold = max(cal_curve, key=lambda c: (min(c[1], c[2]), c[1]))[0]
    capsys.readouterr()

    folder, truth = planted["pool"]
    argv = [
        "embed,dedup",
        "--workdir",
        str(tmp_path / "pool"),
        "progress=false",
        f"embed.input.path={folder}",
        f"embed.model.path={curation_model.run_dir}",
        "embed.shard_size=1000",
        *flip,
        "index.kind=flat",
        "dedup.k=8",
        f"dedup.threshold={threshold}",
    ]
    assert main(argv) == 0
    summaries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summaries[0]["count"] == N_ORIGINALS + N_COPIES and summaries[0]["num_skipped"] == 0
    x, paths = emb_io.load_embeddings(tmp_path / "pool" / "embeddings")
    names = [os.path.basename(p) for p in paths]
    pairs = np.load(tmp_path / "pool" / "dedup" / "pairs.npy")
    found = {tuple(sorted((names[i], names[j]))) for i, j in zip(pairs["i"], pairs["j"])}
    precision, recall = pair_precision_recall(found, truth)

    around = np.round(threshold + np.arange(-0.1, 0.1001, 0.02), 3)
    curve = all_pairs_curve(x, names, truth, [t for t in around if t < 1])
    planted_sims = np.sort([x[names.index(a)] @ x[names.index(b)] for a, b in truth])
    with capsys.disabled():
        print(
            f"\nnear-duplicate detection: {N_ORIGINALS} unseen CIFAR-10 test images + {N_COPIES} planted copies "
            f"(crop >= 60 % area, flip p=0.5, jitter 0.9-1.1, JPEG q30); model k-NN {curation_model.knn}"
        )
        print(f"  threshold {threshold:.3f} (calibrated on {len(x_cal)} other images with {len(cal_truth)} copies)")
        print(f"  dedup stage (k=8): {len(found)} pairs, precision {precision:.3f}, recall {recall:.3f}")
        print(
            f"  planted pairs' cosine: min {planted_sims[0]:.3f}, 10th pct {planted_sims[len(truth) // 10]:.3f}, "
            f"median {planted_sims[len(truth) // 2]:.3f}"
        )
        print("  all-pairs precision/recall around the threshold:")
        for t, p, r, n in curve:
            print(f"    {t:.3f}: precision {p:.3f} recall {r:.3f} ({n} pairs)")
    assert precision >= 0.9 and recall >= 0.9


def test_class_queries_retrieve_their_class(shared_data, curation_model, tmp_path, capsys):
    small = shared_data / "cifar10-small"
    test_idx = np.load(small / "test_idx.npy")
    test_y = np.load(shared_data / "cifar10" / "test_y.npy")
    np.save(tmp_path / "queries_idx.npy", test_idx[test_y[test_idx] == QUERY_CLASS])
    common = [
        "--workdir",
        str(tmp_path),
        "progress=false",
        "embed.input.kind=blobs",
        f"embed.input.path={shared_data / 'cifar10'}",
        f"embed.model.path={curation_model.run_dir}",
        "embed.shard_size=5000",
    ]
    pool_args = [f"embed.input.subset_path={small / 'train_idx.npy'}", "embed.input.split=train"]
    query_args = [
        f"embed.input.subset_path={tmp_path / 'queries_idx.npy'}",
        "embed.input.split=test",
        "embeddings=queries",
    ]
    assert main(["embed", *common, *pool_args]) == 0
    assert main(["embed", *common, *query_args]) == 0
    query_set = f"{{path: queries, name: {CLASSES[QUERY_CLASS]}, k: {RETRIEVAL_K}}}"
    (tmp_path / "retrieve.yaml").write_text(f"retrieve:\n  input: all\n  query_sets:\n    - {query_set}\n")
    assert main(["retrieve", "--config", str(tmp_path / "retrieve.yaml"), *common, *pool_args]) == 0
    capsys.readouterr()

    pool, pool_paths = emb_io.load_embeddings(tmp_path / "embeddings")
    queries, _ = emb_io.load_embeddings(tmp_path / "queries")
    train_y = np.load(shared_data / "cifar10" / "train_y.npy")
    pool_y = np.array([train_y[int(p.rsplit("[", 1)[1].rstrip("]"))] for p in pool_paths])  # ".../train_jpeg.npy[i]"
    nearest = np.argsort(-(queries @ pool.T), axis=1)[:, :RETRIEVAL_K]
    precision_at_k = (pool_y[nearest] == QUERY_CLASS).mean()
    selected = np.load(tmp_path / "retrieve" / "selected.npy")
    union_precision = (pool_y[selected] == QUERY_CLASS).mean()
    with capsys.disabled():
        print(
            f"\nretrieval, {len(queries)} test '{CLASSES[QUERY_CLASS]}' queries against {len(pool)} train images: "
            f"precision@{RETRIEVAL_K} {precision_at_k:.3f} (chance 0.100); retrieve stage selected "
            f"{len(selected)} images, {union_precision:.3f} of them '{CLASSES[QUERY_CLASS]}'"
        )
    assert precision_at_k > 2 * 0.1 and union_precision > 1.5 * 0.1  # chance: 0.1
