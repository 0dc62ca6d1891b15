"""Issue 15's acceptance run: the README's commands, end to end, on a folder of real mixed-size photos.

CIFAR-10 photos (../shared/data) in six sizes and aspect ratios, as JPEG and as PNG/TIFF in every PIL mode,
in ``photos/train/<class>/`` and ``photos/val/<class>/``. With the demo preset shrunk to a tiny ViT:
train → kill -9 after the first checkpoint → the same command resumes and finishes (final k-NN on
``val``) → ``dinov2-eval knn`` / ``linear`` / ``attention`` → ``dinov2-curate`` (embed, dedup, cluster,
sample, manifest) → train on the manifest → distil a narrower student. Every step's output is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from photos import MODES, SIZES, write_photo_folder
from tiny_config import TINY_MODEL, TINY_TRAIN

from dinov2.config import load_config
from dinov2.eval.cli import main as eval_main
from dinov2.launch.distill_cli import main as distill_main
from dinov2.launch.train_cli import main as train_main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY_CROPS = [
    "data.crops.global_crops_size=16",
    "data.crops.local_crops_size=8",
    "data.crops.local_crops_number=2",
    "data.batch_size_per_gpu=16",  # slow enough per step that the kill lands mid-run
    "data.num_workers=0",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_readme_commands_on_a_folder_of_photos(shared_data, tmp_path, capsys):
    photos = tmp_path / "photos"
    write_photo_folder(shared_data, photos / "train", per_class=16)  # 48 photos, every mode and size 4 times
    write_photo_folder(shared_data, photos / "val", per_class=6, split="test")
    assert len({p.suffix for p in photos.rglob("*.*")}) == len({s for _, s in MODES}) and len(SIZES) == 6

    # dinov2-train --config train/demo data.dataset.path=… train.output_dir=…, killed with -9, run again
    run = tmp_path / "run"
    train_args = ["--config", "train/demo", *TINY_MODEL, *TINY_TRAIN, *TINY_CROPS, f"data.dataset.path={photos}",
                  f"train.output_dir={run}", "train.max_iterations=10", "train.checkpoint_every=2",
                  "eval.final_knn=true", "eval.knn_k=[5]", "eval.test_split=val"]  # fmt: skip
    command = [sys.executable, "-m", "dinov2.launch.train_cli", *train_args]
    proc = subprocess.Popen(command, env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run / "checkpoints" / "ckpt_00000002" / ".metadata"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, "the run finished before it could be killed"
    assert not (run / "teacher_backbone.safetensors").exists()
    done = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "Traceback" not in done.stderr
    assert "finished 10 iterations" in done.stdout
    knn_line = [line for line in done.stdout.splitlines() if line.startswith("k-NN top-1 (teacher)")]
    assert len(knn_line) == 1 and "the held-out split 'val'" in knn_line[0], done.stdout
    cfg = load_config(run / "config.yaml")
    assert (cfg.data.dataset.kind, cfg.data.dataset.path) == ("folder", str(photos))  # not the demo images
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(10)) and all("timestamp" in r for r in rows)
    assert (run / "teacher_backbone.safetensors").stat().st_mode & 0o777 == (run / "config.yaml").stat().st_mode & 0o777

    # dinov2-eval knn --checkpoint RUN --dataset folder:/data/labelled:train,val (and linear, attention)
    knn = subprocess.run(
        [sys.executable, "-m", "dinov2.eval.cli", "knn", "--checkpoint", str(run), "--dataset",
         f"folder:{photos}:train,val", "--device", "cpu", "--no-progress", "--ks", "5"],  # fmt: skip
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert knn.returncode == 0, knn.stderr[-3000:]
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert (result["num_train"], result["num_test"], result["crop"]) == (48, 18, 16) and "queries" not in result
    assert 0.0 <= result["top1"]["5"] <= 100.0
    common = ["--checkpoint", str(run), "--dataset", f"folder:{photos}:train,val", "--device", "cpu", "--no-progress"]
    assert eval_main(["linear", *common, "--lrs", "0.01", "0.1", "--epochs", "2"]) == 0
    assert json.loads((run / "eval" / "linear.json").read_text())["best_lr"] in (0.01, 0.1)
    assert eval_main(["attention", *common, "--num-images", "4"]) == 0
    attention = json.loads((run / "eval" / "attention.json").read_text())
    assert Path(attention["png"]).stat().st_size > 2_000 and attention["columns"][0] == "image"
    assert eval_main(["knn", "--checkpoint", str(run / "checkpoints" / "ckpt_00000008"), *common[2:]]) == 0
    assert json.loads((run / "eval" / "knn-2.json").read_text())["weights"].endswith("ckpt_00000008")

    # dinov2-curate embed,dedup,cluster,sample,manifest … embed.input.path=… embed.model.path=RUN
    work = tmp_path / "curate"  # a 10-iteration ViT: near-collapsed features, so a dedup threshold near 1
    curate = subprocess.run(
        [sys.executable, "-m", "data_curation.cli", "embed,dedup,cluster,sample,manifest", "--workdir", str(work),
         f"embed.input.path={photos / 'train'}", f"embed.model.path={run}", "dedup.threshold=0.99999",
         "cluster.n_clusters=[6,2]", "sample.target_size=24"],  # fmt: skip
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = curate.stdout + curate.stderr
    assert curate.returncode == 0, log[-3000:]
    assert "Traceback" not in log and "Could not load library" not in log and "Iteration " not in log, log[-3000:]
    manifest = work / "manifest" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    assert lines[0] == "path,source,label" and 2 <= len(lines) - 1 <= 24
    assert all(Path(line.split(",")[0]).is_file() for line in lines[1:])

    # dinov2-train … data.dataset.kind=manifest data.dataset.path=…/manifest.csv
    on_manifest = tmp_path / "on_manifest"
    assert train_main(["--config", "train/demo", *TINY_MODEL, *TINY_TRAIN, *TINY_CROPS, "data.dataset.kind=manifest",
                       f"data.dataset.path={manifest}", f"train.output_dir={on_manifest}",
                       "train.max_iterations=2", "eval.final_knn=false"]) == 0  # fmt: skip
    assert (on_manifest / "teacher_backbone.safetensors").is_file()

    # dinov2-distill: a narrower student from the run's teacher, on the same photos
    student = tmp_path / "student"
    assert distill_main(["--config", "train/demo", *TINY_MODEL, *TINY_TRAIN, *TINY_CROPS, "model.embed_dim=16",
                         f"distill.teacher_checkpoint={run}", f"data.dataset.path={photos}",
                         f"train.output_dir={student}", "train.max_iterations=2", "eval.final_knn=true",
                         "eval.knn_k=[5]", "eval.test_split=val"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert (student / "student_backbone.safetensors").is_file()
    assert "k-NN top-1 (student)" in out and "the held-out split 'val'" in out
