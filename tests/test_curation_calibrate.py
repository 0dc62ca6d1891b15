"""Calibrated thresholds and a copy detector trained on the pool itself, on real photos.

The planted set (``benchmarks/copy_detection.py``): CIFAR-10 test photos outside cifar10-small (no model
here trains on them) and one near-copy each of some of them, made with calibrate's transforms, as files
under shuffled names. On it:

* ``calibrate`` (which plants *its own* copies of random pool images) picks a threshold whose precision
  measured on the *other*, evaluation copies is at least 0.9 × its target;
* the copy-detection recipe (``configs/train/copy_detection.yaml``, trained by the trainer on the pool
  folder, unlabelled) beats the DINO embedding of the suite's CPU-minutes model (``cifar_pretrained``) in
  best F1 after fewer training seconds; the classical tiny-image descriptor is printed beside them;
* ``report`` writes the funnel, group sizes, contact sheets and cluster sizes of one run.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from conftest import REPO

pytest.importorskip("faiss")
from data_curation import embeddings as emb_io  # noqa: E402
from data_curation.calibrate import (  # noqa: E402
    GRID,
    Curve,
    choose_threshold,
    decontaminate_curve,
    dedup_curve,
    unlinked_above,
)
from data_curation.cli import main  # noqa: E402
from data_curation.workdir import read_done  # noqa: E402

N_ORIGINALS, N_COPIES = 800, 140
COPY_ITERATIONS = 200  # ~70 CPU-seconds of training (batches of 64, 24 px views)
TARGET = 0.95


def bench():
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks import copy_detection

    return copy_detection


# ------------------------------------------------------------------------------------ estimator
def test_precision_estimate_and_threshold_rule_by_hand():
    """Four copies; copy 2's neighbour at 0.97 is linked to its original at 0.99 (a duplicate already in
    the pool: never a mistake); copy 0's neighbour at 0.85 is a false link for every t below 0.85."""
    positive = np.array([0.95, 0.9, 0.8, 0.5])
    to_copy = np.array([[0.85, 0.1], [0.3, 0.2], [0.97, -np.inf], [0.6, 0.4]])
    to_original = np.array([[0.1, 0.0], [0.0, 0.0], [0.99, -np.inf], [0.0, 0.0]])
    curve = dedup_curve(positive, to_copy, to_original, duplicate_fraction=0.1)
    at = {t: int(np.flatnonzero(np.isclose(GRID, t))[0]) for t in (0.7, 0.849, 0.85, 0.96)}
    assert curve.recall[at[0.7]] == 0.75 and curve.false_rate[at[0.7]] == 0.25
    assert curve.precision[at[0.7]] == pytest.approx(0.1 * 0.75 / (0.1 * 0.75 + 0.25 / 2))
    assert curve.precision[at[0.849]] == pytest.approx(0.1 * 0.5 / (0.1 * 0.5 + 0.25 / 2))
    assert curve.precision[at[0.85]] == 1.0 and curve.recall[at[0.85]] == 0.5
    assert np.isnan(curve.precision[at[0.96]])  # nothing found at all
    assert unlinked_above(to_copy, to_original)[2].sum() == 0
    # decontamination: the fraction of copies with an unlinked neighbour above t (copies 0 and 3 at 0.5)
    flagged = decontaminate_curve(positive, to_copy, to_original, contamination_fraction=0.01)
    i = int(np.flatnonzero(np.isclose(GRID, 0.5))[0])
    assert flagged.false_rate[i] == 0.5 and flagged.recall[i] == 0.75
    assert flagged.precision[i] == pytest.approx(0.01 * 0.75 / (0.01 * 0.75 + 0.99 * 0.5))
    assert GRID[choose_threshold(curve, 0.95)] == 0.85
    # a dip above the first good threshold moves the choice above the dip
    dip = Curve(np.full(len(GRID), 0.5), np.where(GRID == 0.9, 1.0, 0.0), np.where(GRID == 0.9, 0.5, 1.0))
    assert GRID[choose_threshold(dip, 0.95)] == pytest.approx(0.901)
    assert choose_threshold(Curve(np.zeros(len(GRID)), np.zeros(len(GRID)), np.full(len(GRID), np.nan)), 0.9) is None


# ------------------------------------------------------------------------------------ planted set
@pytest.fixture(scope="module")
def planted(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("copy_detection")
    truth = bench().build_pool(shared_data, root / "pool", N_ORIGINALS, N_COPIES)
    return root, truth


@pytest.fixture(scope="module")
def copy_detector(planted):
    """The copy-detection recipe trained on the (unlabelled) pool folder; (run dir, training seconds)."""
    root, _ = planted
    b = bench()
    run = b.train_copy_detector(root / "pool", root / "copy_run", COPY_ITERATIONS, 64, "cpu", tiny=True)
    return run, b.training_seconds(run)


@pytest.fixture(scope="module")
def copy_work(planted, copy_detector):
    """``embed,calibrate`` of the pool with the copy detector (flip-averaged)."""
    root, _ = planted
    x, names, calibration = bench().embed_and_calibrate(
        root / "pool", root / "work_copy", copy_detector[0], "cpu", False
    )
    return root / "work_copy", x, names, calibration


@pytest.mark.slow  # the copy detector trains for ~1 minute (module fixture, shared)
def test_calibrated_threshold_holds_its_precision_on_other_planted_copies(planted, copy_work, capsys):
    root, truth = planted
    work, x, names, calibration = copy_work
    threshold = calibration["dedup"]["threshold"]
    assert threshold is not None, calibration
    # dedup itself, threshold=auto: reads calibrate's choice
    assert main(["dedup", "--workdir", str(work), "progress=false", "index.kind=flat", "dedup.k=8"]) == 0
    pairs = np.load(work / "dedup" / "pairs.npy")
    found = {tuple(sorted((names[i], names[j]))) for i, j in zip(pairs["i"], pairs["j"])}
    precision = len(found & truth.keys()) / max(len(found), 1)
    recall = len(found & truth.keys()) / len(truth)
    estimate = calibration["dedup"]["at_threshold"]
    with capsys.disabled():
        print(
            f"\ncalibrate on {N_ORIGINALS} photos + {N_COPIES} planted copies (copy detector): "
            f"threshold {threshold:.3f}, "
            f"estimated precision {estimate['precision']:.3f} / recall {estimate['recall']:.3f} on its own copies; "
            f"measured on the other planted copies: precision {precision:.3f}, recall {recall:.3f} "
            f"({len(found)} pairs; target {TARGET}, required {0.9 * TARGET:.3f})"
        )
    assert json.loads((work / "dedup" / "DONE").read_text())["summary"]["threshold"] == threshold
    assert precision >= 0.9 * TARGET


@pytest.mark.slow  # the copy detector trains for ~1 minute (module fixture, shared)
def test_copy_detector_beats_the_dino_embedding_with_fewer_training_seconds(
    planted, copy_work, copy_detector, cifar_pretrained, capsys
):
    root, truth = planted
    b = bench()
    _, x_copy, names, calibration = copy_work
    copy = b.evaluate(x_copy, names, truth, calibration["dedup"]["threshold"])
    x_dino, dino_names, dino_calibration = b.embed_and_calibrate(
        root / "pool", root / "work_dino", cifar_pretrained.run_dir, "cpu", False
    )
    dino = b.evaluate(x_dino, dino_names, truth, dino_calibration["dedup"]["threshold"])
    images = [b.load_image(root / "pool" / n) for n in names]
    x_tiny = b.tiny_image(images)
    tiny = b.evaluate(x_tiny, names, truth, b.classical_calibration(images, x_tiny))
    copy_seconds, dino_seconds = copy_detector[1], b.training_seconds(cifar_pretrained.run_dir)
    rows = [
        b.row("tiny image (classical)", 0.0, tiny),
        b.row("dino (cifar_pretrained)", dino_seconds, dino),
        b.row("copy detector (pool, recipe)", copy_seconds, copy),
    ]
    with capsys.disabled():
        print(f"\ncopy detection, {N_ORIGINALS} unseen photos + {N_COPIES} planted copies (calibrate's transforms):")
        print(b.format_table(b.COLUMNS, rows))
    assert copy_seconds <= dino_seconds
    assert copy["best_f1"] > dino["best_f1"]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow  # the copy detector trains for ~1 minute (module fixture, shared)
def test_report_shows_funnel_groups_threshold_pairs_and_clusters(planted, copy_work, copy_detector, shared_data):
    """Also decontamination with ``threshold=auto``: an evaluation set of 100 unseen photos drawn
    independently of the pool (so some of them are in it), calibrated from copies of its images; every
    pool photo that is an evaluation photo is flagged."""
    root, _ = planted
    work = copy_work[0]
    b = bench()
    eval_folder = root / "eval"
    b.build_pool(shared_data, eval_folder, 100, 0, seed=7)
    embed = [
        "embed",
        "--workdir",
        str(work),
        "progress=false",
        "embeddings=eval/set",
        f"embed.input.path={eval_folder}",
    ]
    assert main([*embed, f"embed.model.path={copy_detector[0]}", "embed.flip_average=true"]) == 0
    argv = ["dedup,decontaminate,cluster,report", "--workdir", str(work), "progress=false", "index.kind=flat"]
    argv += ["dedup.k=8", "decontaminate.eval_sets=[eval/set]", "calibrate.n_eval_samples=100"]
    assert main([*argv, "cluster.n_clusters=[20,4]"]) == 0
    calibration = json.loads((work / "calibrate" / "report.json").read_text())
    assert calibration["decontaminate"]["n_copies"] == 100 and calibration["decontaminate"]["threshold"] is not None
    eval_bytes = {p.read_bytes() for p in eval_folder.iterdir()}
    paths = emb_io.read_paths(work / "embeddings")
    in_eval = {r for r, p in enumerate(paths) if open(p, "rb").read() in eval_bytes}
    flagged = set(np.load(work / "decontaminate" / "flagged.npy")["row"].tolist())
    print(f"\ndecontaminate: {len(in_eval)} pool photos are evaluation photos; {len(flagged)} flagged")
    assert in_eval and in_eval <= flagged
    out = work / "report"
    text = (out / "report.md").read_text()
    funnel = [line for line in text.splitlines() if line.startswith("| embed ") or line.startswith("| dedup ")]
    count = emb_io.read_meta(work / "embeddings")["count"]
    kept = len(np.load(work / "dedup" / "kept.npy"))
    assert funnel == [
        f"| embed | {count:,} | {count:,} | 0.0 % |",
        f"| dedup | {count:,} | {kept:,} | {100 * (count - kept) / count:.1f} % |",
    ]
    assert "## Calibration" in text and "## Pairs at the threshold" in text and "20 clusters" in text
    summary = read_done(work, "report")["summary"]
    expected = {"funnel.png", "dedup_groups.png", "largest_groups.png", "threshold_pairs.png", "cluster_sizes.png"}
    assert set(summary["pictures"]) == expected
    for name in expected:
        width, height = _png_size(out / name)
        assert 200 <= width <= 2000 and 100 <= height <= 2000, (name, width, height)
    assert os.path.getsize(out / "largest_groups.png") < 400_000
