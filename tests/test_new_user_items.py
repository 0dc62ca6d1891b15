"""Issue 15: what a new user met on real folders, one or more tests per item, through the CLIs where they meet it.

Each test failed on the code before the fix (see the item's comment for how). The end-to-end run of the
README's commands on a folder of mixed-size photos is ``tests/test_new_user.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from photos import MODES, cifar_images, save_photo, write_flat_folder, write_photo_folder
from PIL import Image
from tiny_config import TINY

from dinov2.config import config_problems, load_config
from dinov2.data.decode import decode_image
from dinov2.eval.backbone_io import load_backbone
from dinov2.eval.cli import main as eval_main
from dinov2.eval.features import eval_sizes
from dinov2.eval.holdout import holdout_split
from dinov2.launch.run import train
from dinov2.launch.train_cli import main as train_main
from dinov2.train.checkpoint import CheckpointManager, NonFiniteStateError, state_is_finite
from dinov2.train.meta_arch import SSLMetaArch
from dinov2.train.trainer import NonFiniteLossError, make_optimizer

REPO = Path(__file__).resolve().parents[1]
RUN = TINY + ["train.checkpoint_every=2", "train.keep_last_checkpoints=3", "eval.final_knn=false"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _cli(module: str, *args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _tree(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``directory``."""
    return {
        str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny run (demo data, 4 iterations, checkpoints at 2 and 4, teacher exported)."""
    run = tmp_path_factory.mktemp("tiny_run")
    train(load_config("train/demo", RUN + [f"train.output_dir={run}", "train.max_iterations=4"]))
    return run


@pytest.fixture(scope="module")
def photos(shared_data, tmp_path_factory) -> Path:
    """3 classes x 8 CIFAR-10 photos of six sizes and every mode, as a labelled folder without splits."""
    return write_photo_folder(shared_data, tmp_path_factory.mktemp("photos") / "labelled", per_class=8)


# ------------------------------------------------------------------------------ 1. mixed-size folders
def test_eval_sizes_follow_the_reference_ratio():
    assert eval_sizes(224) == (256, 224)  # the reference's 256 -> 224
    assert eval_sizes(16) == (18, 16) and eval_sizes(32) == (37, 32)  # round(32 * 256 / 224) = 37
    assert eval_sizes(224, crop=112) == (128, 112)  # the resize follows an explicit crop
    assert eval_sizes(224, resize=0, crop=0) == (None, None)  # 0: as they are


@pytest.mark.slow
def test_eval_cli_on_a_folder_of_mixed_size_photos(tiny_run, photos, tmp_path):
    """Old: ``stack expects each tensor to be equal size`` (traceback) without --resize/--crop."""
    out = tmp_path / "eval"
    proc = _cli("dinov2.eval.cli", "knn", "--checkpoint", str(tiny_run), "--dataset", f"folder:{photos}",
                "--output-dir", str(out), "--device", "cpu", "--no-progress", "--ks", "3")  # fmt: skip
    knn = json.loads((out / "knn.json").read_text())
    assert (knn["resize"], knn["crop"]) == (18, 16)  # global crops of 16 px
    assert "k-NN top-1" in proc.stdout and 0.0 <= knn["top1"]["3"] <= 100.0
    common = ["--checkpoint", str(tiny_run), "--dataset", f"folder:{photos}", "--output-dir", str(out)]
    common += ["--device", "cpu", "--no-progress"]
    assert eval_main(["linear", *common, "--lrs", "0.1", "--epochs", "1"]) == 0
    assert eval_main(["attention", *common, "--num-images", "4"]) == 0
    att = json.loads((out / "attention.json").read_text())
    assert att["grid"] == [4, 4]  # 16 px centre crop, 4 px patches, whatever the photo's shape


# ------------------------------------------------------------------------------ 2. honest held-out k-NN
def test_holdout_split_is_fixed_disjoint_and_named_size():
    bank, queries = holdout_split(24, 0.1)
    assert len(queries) == math.ceil(0.1 * 24) == 3 and len(bank) == 21
    assert not set(bank) & set(queries) and sorted(bank + queries) == list(range(24))
    assert holdout_split(24, 0.1) == (bank, queries)  # the same queries every time


def test_eval_on_one_folder_holds_out_queries_and_says_so(tiny_run, photos, tmp_path, capsys):
    """Old: train and test were the same 24 images (each query found itself), reported as a test score."""
    args = ["knn", "--checkpoint", str(tiny_run), "--dataset", f"folder:{photos}", "--output-dir", str(tmp_path)]
    assert eval_main([*args, "--device", "cpu", "--no-progress", "--ks", "3"]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert (knn["num_train"], knn["num_test"]) == (21, 3)
    assert "held out" in knn["queries"] and "held out" in capsys.readouterr().out


def test_folder_with_train_and_val_subfolders_scores_on_val(tiny_run, shared_data, tmp_path):
    """``folder:/data/labelled:train,val`` (the README's command) reads the two sub-folders."""
    root = tmp_path / "labelled"
    write_photo_folder(shared_data, root / "train", per_class=4)
    write_photo_folder(shared_data, root / "val", per_class=2, split="test")
    args = ["knn", "--checkpoint", str(tiny_run), "--dataset", f"folder:{root}:train,val", "--ks", "3"]
    assert eval_main([*args, "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 0
    knn = json.loads((tmp_path / "out" / "knn.json").read_text())
    assert (knn["num_train"], knn["num_test"]) == (12, 6) and "queries" not in knn


def test_split_folder_without_the_named_split_is_one_line(tiny_run, shared_data, tmp_path, capsys):
    """Old: the whole folder was read, its ``train``/``val`` sub-folders became the two classes."""
    root = tmp_path / "labelled"
    write_photo_folder(shared_data, root / "train", per_class=2)
    write_photo_folder(shared_data, root / "val", per_class=1, split="test")
    args = ["knn", "--checkpoint", str(tiny_run), "--dataset", f"folder:{root}", "--output-dir", str(tmp_path / "o")]
    assert eval_main([*args, "--device", "cpu", "--no-progress"]) == 2  # the test side: no test/ sub-folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has the split sub-folder(s) train, val but no 'test'" in err[0]
    run = tmp_path / "run"
    overrides = [f"data.dataset.path={root}", f"train.output_dir={run}", "eval.final_knn=true"]
    assert train_main(["--config", "train/demo", *TINY, *overrides]) == 2  # checked before any work
    assert "no 'test'" in capsys.readouterr().err and not run.exists()


@pytest.mark.slow
def test_final_knn_on_a_folder_without_split_is_labelled_held_out(photos, tmp_path):
    """Old: printed "k-NN top-1 … on the held-out split" for the training images themselves."""
    cfg = load_config("train/demo", RUN + ["train.max_iterations=2", "eval.final_knn=true", "eval.knn_k=[3]",
                                           f"data.dataset.path={photos}", f"train.output_dir={tmp_path}"])  # fmt: skip
    assert cfg.data.dataset.kind == "demo"  # TINY's kind: the path makes it a folder (item 7)
    result = train(cfg)
    assert set(result.knn) == {3} and "3 images (10%) held out" in result.knn_description
    assert "not a validation score" in result.knn_description


@pytest.mark.slow
def test_unlabelled_folder_skips_final_knn_with_one_line(shared_data, tmp_path):
    """Old: ``ValueError: k-NN needs labelled train data``, exit 1, after the export."""
    flat = write_flat_folder(shared_data, tmp_path / "flat", 12)
    proc = _cli("dinov2.launch.train_cli", "--config", "train/demo", *TINY, "data.dataset.kind=folder",
                f"data.dataset.path={flat}", f"train.output_dir={tmp_path / 'run'}", "train.max_iterations=2",
                "eval.final_knn=true")  # fmt: skip
    assert (tmp_path / "run" / "teacher_backbone.safetensors").is_file()
    skips = [line for line in proc.stderr.splitlines() if "final k-NN skipped" in line]
    assert len(skips) == 1 and "no labels" in skips[0] and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ 3. finite checkpoints
def test_checkpoint_of_a_non_finite_state_is_not_written(tmp_path):
    """A finite loss can come with overflowed AdamW moments. Old: written, and every resume failed again."""
    cfg = load_config("train/demo", TINY)
    model = SSLMetaArch(cfg)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    manager = CheckpointManager(tmp_path)
    manager.save(1, model, optimizer, sample_position=8)
    param = next(p for p in model.student.parameters())
    optimizer.state[param]["exp_avg_sq"] = torch.full_like(param, float("inf"))
    assert not state_is_finite(model, optimizer)
    with pytest.raises(NonFiniteStateError):
        manager.save(2, model, optimizer, sample_position=16)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_00000001"]


@pytest.mark.slow
def test_nan_names_the_newest_finite_checkpoint_and_the_resume_command(tmp_path):
    """Old: "the last good checkpoint is kept … resume" — no path, no command."""
    base = RUN + [f"train.output_dir={tmp_path}"]
    train(load_config("train/demo", base + ["train.max_iterations=4", "train.export_teacher=false"]))
    with pytest.raises(NonFiniteLossError) as failure:
        train(load_config("train/demo", base + ["train.max_iterations=8", "optim.base_lr=1e30"]))
    message = str(failure.value)
    newest = tmp_path / "checkpoints" / "ckpt_00000004"
    assert f"newest finite checkpoint is {newest}" in message
    command = message.rsplit(": ", 1)[1]
    assert command == f"dinov2-train --config {tmp_path / 'config.yaml'} optim.base_lr=5e+29"
    for ckpt in CheckpointManager(tmp_path / "checkpoints").complete():  # everything on disk is finite
        cfg = load_config(tmp_path / "config.yaml")
        model = SSLMetaArch(cfg)
        CheckpointManager(ckpt.parent).load(ckpt, model, None)
        assert state_is_finite(model), ckpt
    args = shlex.split(command)[1:]
    assert args[:2] == ["--config", str(tmp_path / "config.yaml")]  # the command parses as dinov2-train's


# ------------------------------------------------------------------------------ 4. run dir of another config
@pytest.mark.slow
def test_rerun_with_another_model_stops_naming_the_key_and_writes_nothing(tiny_run):
    """Old: config.yaml overwritten before the checkpoint failed to load (a traceback); the export then
    loaded nowhere."""
    before = _tree(tiny_run)
    proc = _cli("dinov2.launch.train_cli", "--config", "train/demo", *RUN, f"train.output_dir={tiny_run}",
                "train.max_iterations=4", "model.embed_dim=48", check_rc=2)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dinov2-train: error:"), proc.stderr
    assert "model.embed_dim: 32 -> 48" in lines[0]
    assert _tree(tiny_run) == before


def test_rerun_with_other_schedule_settings_still_resumes(tiny_run, tmp_path):
    """Only the model / data keys must match: a longer run resumes as before."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = train(load_config("train/demo", RUN + [f"train.output_dir={run}", "train.max_iterations=6"]))
    assert result.iterations == 6 and (run / "checkpoints" / "ckpt_00000006").is_dir()


# ------------------------------------------------------------------------------ 5. corrupt newest checkpoint
@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    """Old: a 49-line DCP/pickle traceback naming no path, no fallback."""
    import shutil

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(load_config("train/demo", RUN + [f"train.output_dir={straight}", "train.max_iterations=4"]))
    shutil.copytree(straight, broken)
    newest = broken / "checkpoints" / "ckpt_00000004"
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    truncated = shard.read_bytes()[: shard.stat().st_size // 2]
    shard.write_bytes(truncated)  # one file of the newest checkpoint truncated
    with caplog.at_level(logging.WARNING):
        result = train(load_config("train/demo", RUN + [f"train.output_dir={broken}", "train.max_iterations=4"]))
    assert result.iterations == 4
    said = [r.getMessage() for r in caplog.records if "cannot resume from" in r.getMessage()]
    assert len(said) == 1 and str(newest) in said[0]
    aside = newest.with_name(newest.name + ".bad")  # replaced by the recomputed one, the bad one kept aside
    assert (aside / shard.name).read_bytes() == truncated
    cfg = load_config(straight / "config.yaml")
    for name in ("ckpt_00000002", "ckpt_00000004"):  # the fallback run is the uninterrupted one, bit for bit
        a, b = SSLMetaArch(cfg), SSLMetaArch(cfg)
        CheckpointManager(straight / "checkpoints").load(straight / "checkpoints" / name, a, None)
        CheckpointManager(broken / "checkpoints").load(broken / "checkpoints" / name, b, None)
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), (name, key)


# ------------------------------------------------------------------------------ 6. every PIL mode
def test_every_pil_mode_decodes_to_the_picture(shared_data, tmp_path):
    """Old: I;16, I and F images decoded to (nearly) all white."""
    rgb = cifar_images(shared_data, "test", [7])[0][0].resize((40, 32), Image.BICUBIC)
    grey = np.asarray(rgb.convert("L")).astype(int)
    for mode, suffix in MODES:
        path = save_photo(rgb, mode, tmp_path / f"photo_{mode.replace(';', '')}{suffix}")
        with Image.open(path) as stored:
            assert stored.mode == mode, path
            stored_pixels = np.asarray(stored.convert("L") if mode == "1" else stored).astype(int)
        got = np.asarray(decode_image(path)).astype(int)
        assert got.shape == (32, 40, 3), mode
        if mode in ("I;16", "I", "F"):  # grey * 257 or grey / 255: exactly the grey levels back
            assert np.array_equal(got, np.stack([grey] * 3, -1)), mode
        elif mode == "1":
            assert np.array_equal(got[..., 0], stored_pixels) and set(np.unique(got)) == {0, 255}
        elif mode in ("L", "LA"):
            expected = stored_pixels if stored_pixels.ndim == 2 else stored_pixels[..., 0]
            assert np.array_equal(got, np.stack([expected] * 3, -1)), mode
        else:  # RGB, RGBA (opaque), P (64 colours), CMYK and JPEG: close to the photo
            assert np.abs(got - np.asarray(rgb).astype(int)).mean() < 6, mode


def test_transparent_pixels_are_composited_on_white(tmp_path):
    """Old: ``convert("RGB")`` showed the colour stored under fully transparent pixels (here red)."""
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere …
    rgba[:, :3, 3] = 255  # … opaque on the left half only
    rgba[:, 3:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    got = np.asarray(decode_image(tmp_path / "half.png"))
    assert (got[:, :3] == [255, 0, 0]).all() and (got[:, 3:] == 255).all()
    la = np.stack([np.full((2, 2), 10, np.uint8), np.array([[255, 0], [255, 0]], np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.asarray(decode_image(tmp_path / "la.png")).tolist() == [[[10] * 3, [255] * 3]] * 2


# ------------------------------------------------------------------------------ 7. demo preset + a path
def test_demo_preset_reads_the_given_path(photos, tmp_path):
    """Old: kind stayed ``demo``: the run trained on generated images."""
    overrides = RUN + [f"data.dataset.path={photos}", f"train.output_dir={tmp_path}", "train.max_iterations=1"]
    assert train_main(["--config", "train/demo", *overrides]) == 0
    saved = load_config(tmp_path / "config.yaml")
    assert saved.data.dataset.kind == "folder" and saved.data.dataset.path == str(photos)


def test_auto_kind_reads_what_the_path_holds(photos, tmp_path):
    from dinov2.config import DatasetConfig
    from dinov2.data.datasets import resolve_kind

    (tmp_path / "list.txt").write_text("a.jpg 0\n")
    (tmp_path / "manifest.csv").write_text("path,source,label\na.jpg,b.jpg,\n")
    (tmp_path / "list.csv").write_text("path,label\na.jpg,0\n")
    cases = {str(photos): "folder", str(tmp_path / "list.txt"): "filelist", str(tmp_path / "list.csv"): "filelist",
             str(tmp_path / "manifest.csv"): "manifest", "/data/train-{000000..000009}.tar": "shards",
             "/data/a.tar::/data/b.tar": "shards", str(tmp_path / "x.npz"): "arrays"}  # fmt: skip
    for path, kind in cases.items():
        assert resolve_kind(DatasetConfig(kind="auto", path=path)) == kind, path


# ------------------------------------------------------------------------------ 8. validation before any work
BAD_SETTINGS = {
    "train.checkpoint_every=0": "train.checkpoint_every",  # old: ZeroDivisionError after step 1
    "data.batch_size_per_gpu=0": "data.batch_size_per_gpu",  # old: math domain error
    "optim.base_lr=-0.1": "optim.base_lr",  # old: accepted
    "model.depth=0": "model.depth",  # old: an untrained export, exit 0
    "train.max_iterations=0": "train.max_iterations",  # old: an untrained export, exit 0
    "model.arch=vit_huge": "model.arch",  # old: traceback
    "data.crops.global_crops_size=18": "global_crops_size",  # old: traceback (patch 4)
    "data.dataset.kind=pictures": "data.dataset.kind",  # old: traceback
    "data.crops.local_crops_size=10": "local_crops_size",  # with 2 local crops (TINY)
}


@pytest.mark.parametrize("setting", list(BAD_SETTINGS))
def test_bad_setting_is_one_line_exit_2_and_nothing_written(setting, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--config", "train/demo", *TINY, f"train.output_dir={run}", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dinov2-train: error:") and BAD_SETTINGS[setting] in err[0], err
    assert not run.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_output_dirs_are_one_line_exit_2(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, Path("/proc/dinov2-run")):  # /proc: read-only even for root
        assert train_main(["--config", "train/demo", *TINY, f"train.output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dinov2-train: error: train.output_dir="), err
    assert a_file.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_local_crop_size_is_only_checked_with_local_crops():
    cfg = load_config("train/demo", TINY + ["data.crops.local_crops_size=10", "data.crops.local_crops_number=0"])
    assert not [p for p in config_problems(cfg) if "local_crops_size" in p]


@pytest.mark.slow
def test_corrupt_image_counter_counts_files_not_skip_events(shared_data, tmp_path):
    """Old: every draw of a bad file counted (201 for 9 bad files)."""
    folder = write_flat_folder(shared_data, tmp_path / "images", 13, prefix="good_")
    (folder / "truncated.jpg").write_bytes((folder / "good_0.jpg").read_bytes()[:200])
    (folder / "garbage.jpg").write_bytes(b"not an image" * 20)
    (folder / "empty.png").write_bytes(b"")
    data = ["data.dataset.kind=folder", f"data.dataset.path={folder}", "train.max_iterations=8"]
    cfg = load_config("train/demo", RUN + data + [f"train.output_dir={tmp_path / 'run'}"])
    result = train(cfg)  # 64 draws from 16 files: each bad one is drawn several times
    assert result.num_skipped == 3


# ------------------------------------------------------------------------------ 9. intermediate checkpoints
def test_eval_reads_an_intermediate_checkpoint(tiny_run, tmp_path, capsys):
    """Old: ``rng_rank0.pt`` was read as the weights."""
    final, _ = load_backbone(tiny_run / "checkpoints" / "ckpt_00000004")
    exported, _ = load_backbone(tiny_run)  # the export is the teacher of the last checkpoint
    for (key, a), b in zip(final.state_dict().items(), exported.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    middle = tiny_run / "checkpoints" / "ckpt_00000002"
    args = ["knn", "--checkpoint", str(middle), "--dataset", "demo:", "--dataset-opt", "demo_num_train=32"]
    args += ["--dataset-opt", "demo_num_test=16", "--dataset-opt", "demo_image_size=16", "--ks", "3"]
    assert eval_main([*args, "--output-dir", str(tmp_path), "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((tmp_path / "knn.json").read_text())["weights"] == str(middle)
    earlier, _ = load_backbone(middle)
    assert any(not torch.equal(a, b) for a, b in zip(earlier.state_dict().values(), final.state_dict().values()))


# ------------------------------------------------------------------------------ 10. smaller things
@pytest.mark.slow
def test_distill_cli_names_itself(tmp_path, capsys):
    """Old: ``dinov2-distill --help`` printed dinov2-train's usage; its errors said ``dinov2-train:``."""
    proc = _cli("dinov2.launch.distill_cli", "--help")
    assert proc.stdout.startswith("usage: dinov2-distill") and "frozen teacher" in proc.stdout
    from dinov2.launch.distill_cli import main as distill_main

    assert distill_main(["--config", "train/demo", *TINY, "train.checkpoint_every=0"]) == 2
    assert capsys.readouterr().err.startswith("dinov2-distill: error: train.checkpoint_every")


@pytest.mark.slow
def test_metrics_rows_have_timestamps_and_appear_once_after_resume(tmp_path):
    """Old: no timestamp; iterations logged after the last checkpoint were logged again by the resumed run."""
    import shutil

    base = RUN + [f"train.output_dir={tmp_path}", "train.export_teacher=false", "train.max_iterations=4"]
    train(load_config("train/demo", base))
    shutil.rmtree(tmp_path / "checkpoints" / "ckpt_00000004")  # as if killed after logging iteration 3
    train(load_config("train/demo", base))  # resumes at 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(4))
    stamps = [r["timestamp"] for r in rows]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] < 3600


def test_tensorboard_is_an_extra_and_its_absence_is_said_once(tmp_path, caplog):
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("tensorboard") for req in extras["tensorboard"])
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        from dinov2.train import metrics

        metrics._hinted_tensorboard = False
        with caplog.at_level(logging.INFO, logger="dinov2.train.metrics"):
            for i in range(3):
                metrics.MetricsWriter(tmp_path / str(i), tensorboard=True).close()
        hints = [r for r in caplog.records if "tensorboard" in r.getMessage()]
        assert len(hints) == 1 and "dinov2-train[tensorboard]" in hints[0].getMessage()


def test_export_is_readable_like_the_other_files(tiny_run):
    """Old: safetensors wrote teacher_backbone.safetensors 0600 while config.yaml was 0644."""
    mask = os.umask(0o022)
    os.umask(mask)
    mode = (tiny_run / "teacher_backbone.safetensors").stat().st_mode & 0o777
    assert mode == (tiny_run / "config.yaml").stat().st_mode & 0o777 == 0o666 & ~mask


def test_eval_results_are_not_overwritten_and_attention_columns_are_named(tiny_run, tmp_path):
    args = ["--checkpoint", str(tiny_run), "--dataset", "demo:", "--dataset-opt", "demo_num_train=32"]
    args += ["--dataset-opt", "demo_num_test=16", "--dataset-opt", "demo_image_size=16"]
    args += ["--output-dir", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert eval_main(["knn", *args, "--ks", "3"]) == 0
    assert eval_main(["knn", *args, "--ks", "5"]) == 0  # old: replaced the first one's knn.json
    assert set(json.loads((tmp_path / "knn.json").read_text())["top1"]) == {"3"}
    assert set(json.loads((tmp_path / "knn-2.json").read_text())["top1"]) == {"5"}
    assert eval_main(["attention", *args, "--num-images", "2"]) == 0
    att = json.loads((tmp_path / "attention.json").read_text())
    assert att["columns"] == ["image", "head 0", "head 1", "mean"]
    from dinov2.eval.attention_maps import HEADER_HEIGHT

    picture = np.asarray(Image.open(att["png"]).convert("L"))
    panel = (picture.shape[1] + 2) // 4  # 4 columns, 2 px gaps
    for j in range(4):  # dark text in the header above every column
        assert (picture[:HEADER_HEIGHT, j * panel : (j + 1) * panel - 2] < 128).any(), j


def test_readme_documents_interop_with_the_functions_it_names():
    import dinov2.interop

    text = (REPO / "README.md").read_text()
    section = text.split("## Interop", 1)[1].split("\n## ", 1)[0]
    for name in ("load_pretrained_backbone", "export_state_dict", "timm_model_kwargs", "hf_config_kwargs"):
        assert name in section and callable(getattr(dinov2.interop, name)), name
    assert '"timm")' in section and '"hf"' in section and "timm" in section and "transformers" in section
