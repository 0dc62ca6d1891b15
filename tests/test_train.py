"""Training end to end on CPU: NaN stop, corrupt images, teacher/EMA rules (resume: test_resume.py)."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import expected_skips
from tiny_config import SEPARATE_IBOT_HEAD, TINY

from dinov2.config import load_config
from dinov2.data import build_train_loader
from dinov2.launch.run import train
from dinov2.train.checkpoint import CheckpointManager
from dinov2.train.meta_arch import SSLMetaArch
from dinov2.train.metrics import read_metrics
from dinov2.train.trainer import NonFiniteLossError


def _sha(directory: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    base = TINY + [f"train.output_dir={tmp_path}", "train.checkpoint_every=2", "eval.final_knn=false"]
    train(load_config("train/demo", base + ["train.max_iterations=4", "train.export_teacher=false"]))
    good = tmp_path / "checkpoints" / "ckpt_00000004"
    before = _sha(good)
    exploding = load_config("train/demo", base + ["train.max_iterations=8", "optim.base_lr=1e30"])
    with pytest.raises(NonFiniteLossError, match="newest finite checkpoint is"):
        train(exploding)
    assert CheckpointManager(tmp_path / "checkpoints").latest() == good
    assert _sha(good) == before
    assert not (tmp_path / "teacher_backbone.safetensors").exists()


def _write_images(folder: Path, n_good: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"good_{i}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, format="JPEG")
    bad = [folder / "truncated.jpg", folder / "garbage.jpg", folder / "empty.png"]
    bad[0].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    bad[1].write_bytes(b"this is not an image" * 10)
    bad[2].write_bytes(b"")
    return bad


def test_folder_with_corrupt_files_trains_and_reports(tmp_path, caplog):
    bad = _write_images(tmp_path / "images", n_good=13)
    cfg = load_config(
        "train/demo",
        TINY
        + [
            "data.dataset.kind=folder",
            f"data.dataset.path={tmp_path / 'images'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_iterations=3",
            "eval.final_knn=false",
        ],
    )
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    assert result.iterations == 3
    # 24 samples drawn from 16 files: bad records are drawn more than once (expected_skips counts the
    # draws), the run counts the files
    assert expected_skips([str(p) for p in bad], 24, seed=cfg.train.seed) > len(bad)
    assert result.num_skipped == len(bad) == 3
    for path in bad:
        assert sum(str(path) in r.getMessage() for r in caplog.records) == 1  # reported once per path
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["num_skipped"] == result.num_skipped


def test_missing_dataset_path_is_a_one_line_error(tmp_path):
    cfg = load_config(
        "train/demo",
        TINY + ["data.dataset.kind=folder", f"data.dataset.path={tmp_path / 'nope'}", f"train.output_dir={tmp_path}"],
    )
    with pytest.raises(FileNotFoundError, match="data.dataset.path"):
        train(cfg)


def test_batch_without_masked_patches_keeps_the_ibot_head_in_the_graph():
    """A rank whose batch has no masked patch still logs an iBOT term (0) and gives the separate iBOT
    head (zero) gradients: under FSDP every rank must run the same collectives and log the same keys."""
    cfg = load_config("train/demo", TINY + SEPARATE_IBOT_HEAD + ["data.masks.mask_probability=0"])
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).train()
    batch = next(iter(build_train_loader(cfg.data, cfg.model.patch_size)))
    assert batch["mask_indices"].numel() == 0
    step = model(batch, teacher_temp=0.04)
    assert step.parts["ibot"].item() == 0.0
    torch.testing.assert_close(step.loss.detach(), step.parts["dino"] + 0.1 * step.parts["koleo"])
    step.loss.backward()
    grads = [p.grad for p in model.student.ibot_head.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)


def test_teacher_starts_equal_gets_no_grad_and_follows_ema():
    cfg = load_config("train/demo", TINY)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).train()
    for (ns, ps), (nt, pt) in zip(model.student.named_parameters(), model.teacher.named_parameters(), strict=True):
        assert ns == nt and torch.equal(ps, pt) and not pt.requires_grad
    batch = next(iter(build_train_loader(cfg.data, cfg.model.patch_size)))
    step = model(batch, teacher_temp=0.04)
    assert set(step.parts) >= {"dino", "ibot", "koleo", "loss"}
    step.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    before_t = [p.detach().clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    student = [p.detach().clone() for p in model.student.parameters()]
    model.update_ema(0.9)
    for t0, s, t1 in zip(before_t, student, model.teacher.parameters(), strict=True):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-6)
