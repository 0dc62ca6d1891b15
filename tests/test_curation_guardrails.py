"""Guardrails: what a new user meets with the defaults on a small pool of real photos.

The scenario of issue 16: ``dinov2-curate embed,dedup,cluster,sample,manifest`` with default settings on
340 photos and a model trained by ``dinov2-train``. Before, dedup's fixed 0.6 threshold removed 339 of
them and ``cluster`` crashed with a traceback. Now the command ends with a sensible result or one
``dinov2-curate: error: …`` line (exit 2), never a traceback and never more than half the pool removed
without ``--force``; every stage reports images in / out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

pytest.importorskip("faiss")
from data_curation import embeddings as emb_io  # noqa: E402
from data_curation.cli import main  # noqa: E402

N_PHOTOS = 340


@pytest.fixture(scope="module")
def photos(shared_data, tmp_path_factory):
    """340 real CIFAR-10 photos (test split, outside cifar10-small) as JPEG files in one folder."""
    blob = np.load(shared_data / "cifar10" / "test_jpeg.npy", mmap_mode="r")
    offsets = np.load(shared_data / "cifar10" / "test_jpeg_offsets.npy")
    unseen = np.setdiff1d(np.arange(len(offsets) - 1), np.load(shared_data / "cifar10-small" / "test_idx.npy"))
    folder = tmp_path_factory.mktemp("photos")
    for n, i in enumerate(np.random.default_rng(5).choice(unseen, N_PHOTOS, replace=False)):
        (folder / f"photo_{n:03d}.jpg").write_bytes(blob[offsets[i] : offsets[i + 1]].tobytes())
    return folder


def curate(*argv: str) -> subprocess.CompletedProcess:
    """``dinov2-curate`` as a user runs it: its own process, output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "data_curation.cli", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def summaries(stdout: str) -> dict[str, dict]:
    return {s["stage"]: s for s in (json.loads(line) for line in stdout.splitlines() if line.startswith("{"))}


@pytest.fixture(scope="module")
def default_run(photos, curation_model, tmp_path_factory):
    """The issue's command with default settings, in its own process: (process, work dir)."""
    work = tmp_path_factory.mktemp("default_run")
    proc = curate(
        "embed,dedup,cluster,sample,manifest",
        "--workdir",
        str(work),
        "progress=false",
        f"embed.input.path={photos}",
        f"embed.model.path={curation_model.run_dir}",
    )
    return proc, work


@pytest.mark.slow  # embeds and calibrates 340 photos in a subprocess (module fixture, shared)
def test_default_pipeline_on_340_photos_ends_sensibly_or_with_one_line(default_run):
    proc, work = default_run
    print(proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    done = summaries(proc.stdout)
    assert done["embed"]["images_out"] == N_PHOTOS
    if "dedup" in done:  # calibrate found a threshold; dedup kept at least half the photos
        assert done["dedup"]["removed_fraction"] <= 0.5
        calibrated = json.loads((work / "calibrate" / "DONE").read_text())["summary"]["dedup"]["threshold"]
        assert done["dedup"]["threshold"] == calibrated
        assert f"dedup: {N_PHOTOS:,} images in" in proc.stderr  # the funnel line
    if proc.returncode == 0:
        assert done["manifest"]["n_rows"] >= N_PHOTOS // 2
    else:
        assert proc.returncode == 2
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("dinov2-curate: error: ")
        # the default cluster.n_clusters=[1000, 100] cannot fit 340 photos, or calibrate found no threshold
        assert ("cluster.n_clusters" in last and "e.g. cluster.n_clusters=" in last) or (
            "dedup.threshold=auto" in last and "calibrate" in last
        ), last
        assert not (work / "manifest" / "manifest.csv").exists()


@pytest.mark.slow  # embeds and calibrates 340 photos in a subprocess (module fixture, shared)
def test_a_threshold_too_low_for_the_embedding_is_refused_unless_forced(default_run, tmp_path, capsys):
    """The paper's 0.6 on DINO CLS features links nearly everything: dedup refuses with one line that
    points to calibrate and writes nothing; --force accepts."""
    shutil.copytree(default_run[1] / "embeddings", tmp_path / "embeddings")
    common = ["--workdir", str(tmp_path), "progress=false", "dedup.threshold=0.6"]
    assert main(["dedup", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dinov2-curate: error: dedup would remove ")
    assert "dedup.max_removed_fraction=0.5" in err[0] and "dinov2-curate calibrate" in err[0] and "--force" in err[0]
    assert not (tmp_path / "dedup" / "DONE").exists() and not (tmp_path / "dedup" / "kept.npy").exists()
    assert main(["dedup", "--force", *common]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["removed_fraction"] > 0.5 and summary["images_in"] == N_PHOTOS


def test_stage_inputs_are_checked_before_work_with_one_line_errors(tmp_path, capsys):
    """Synthetic embeddings (no images): each misfit setting is one error line, exit 2, nothing written."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    emb_io.write_embeddings(tmp_path / "embeddings", x, [f"img/{i}.jpg" for i in range(60)])
    base = ["--workdir", str(tmp_path), "progress=false", "dedup.threshold=0.9", "dedup.k=8"]
    cases = [
        (["cluster", "cluster.n_clusters=[100,10]"], "level 1 asks for 100 clusters of 60 inputs"),
        (["cluster", "cluster.n_clusters=[10,20]"], "level 2 asks for 20 clusters of 10 inputs"),
        (["dedup,cluster,sample", "cluster.n_clusters=[6,2]", "sample.target_size=1000"], "sample.target_size=1,000"),
        (["decontaminate", "decontaminate.threshold=0.5"], "decontaminate.eval_sets is empty"),
        (["dedup", "dedup.threshold=auto"], "was not written by `dinov2-curate embed`"),
        (["dedup", "dedup.threshold=1.5"], "dedup.threshold must be a cosine similarity"),
    ]
    for extra, message in cases:
        stages, *overrides = extra
        assert main([stages, *base, *overrides]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dinov2-curate: error: ") and message in err[0], (extra, err)
    assert not (tmp_path / "sample" / "DONE").exists()
    # fitting settings run through, each stage reporting its funnel
    assert main(["dedup,cluster,sample,manifest", *base, "cluster.n_clusters=[6,2]", "sample.target_size=30"]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [s["images_out"] for s in lines] == [60, 60, 30, 30] and lines[2]["removed_fraction"] == 0.5
    # the report of embeddings without images: the funnel and tables, no contact sheets
    assert main(["report", *base]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| sample | 60 | 30 | 50.0 % |" in text and "could not be opened: no contact sheets" in text
