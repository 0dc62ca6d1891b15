"""``dinov2-eval``: the exported-backbone format, dataset specs, and one run of each mode."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from dinov2.config import Config, ModelConfig
from dinov2.eval import load_backbone, save_backbone
from dinov2.eval.backbone_io import read_state_dict
from dinov2.eval.cli import main, parse_dataset_spec
from dinov2.models import build_backbone


def tiny_config() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(
        arch="vit_small",
        embed_dim=32,
        depth=2,
        num_heads=2,
        patch_size=4,
        img_size=32,
        num_register_tokens=1,
        layerscale_init=None,  # random blocks must change the CLS token for the features to mean anything
    )
    cfg.eval.linear_epochs = 2
    return cfg


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config()
    backbone = build_backbone(cfg.model)
    root = tmp_path_factory.mktemp("export")
    path = save_backbone(backbone, cfg, root, "teacher_backbone.pth")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 30)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 60, size=(n, 32, 32, 3), dtype=np.uint8)
        for c in range(3):  # class c: channel c bright, so the classes are easy even for a random ViT
            images[labels == c, :, :, c] += 180
        np.savez(root / f"{split}.npz", images=images, labels=labels)
    return {"backbone": backbone, "weights": path, "root": root}


def test_save_and_load_backbone_roundtrip(export, tmp_path):
    loaded, cfg = load_backbone(export["root"])  # the directory works as well as the file
    assert cfg.model.embed_dim == 32 and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["cls"], export["backbone"].eval()(x)["cls"])
    # wrapped / prefixed state dicts (a meta-arch's teacher, DDP) are unwrapped
    state = export["backbone"].state_dict()
    wrapped = {
        "teacher": {f"module.backbone.{k}": v for k, v in state.items()} | {"module.dino_head.w": torch.zeros(1)}
    }
    torch.save(wrapped, tmp_path / "wrapped.pth")
    assert read_state_dict(tmp_path / "wrapped.pth").keys() == state.keys()
    with pytest.raises(FileNotFoundError, match="config"):
        load_backbone(tmp_path / "wrapped.pth")  # no config.yaml next to it


def test_safetensors_export(export, tmp_path):
    pytest.importorskip("safetensors")
    path = save_backbone(export["backbone"], tiny_config(), tmp_path, "backbone.safetensors")
    loaded, _ = load_backbone(path)
    for k, v in export["backbone"].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_parse_dataset_spec():
    assert parse_dataset_spec("cifar10_blobs:/data/c10") == ("cifar10_blobs", "/data/c10", [])
    assert parse_dataset_spec("cifar10_blobs:/data/c10:train,test") == ("cifar10_blobs", "/data/c10", ["train", "test"])
    assert parse_dataset_spec("folder:/a:b/c") == ("folder", "/a:b/c", [])  # a colon inside the path
    assert parse_dataset_spec("demo") == ("demo", "", [])
    assert parse_dataset_spec("demo::test") == ("demo", "", ["test"])
    with pytest.raises(argparse.ArgumentTypeError):
        parse_dataset_spec(":/x")


def test_cli_knn_linear_attention(export, tmp_path, capsys):
    root = export["root"]
    common = [
        "--checkpoint",
        str(export["weights"]),
        "--dataset",
        f"arrays:{root}/{{split}}.npz",
        "--output-dir",
        str(tmp_path),
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(["knn", *common, "--ks", "1", "5"]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert set(knn["top1"]) == {"1", "5"} and knn["num_train"] == 60 and knn["num_test"] == 30
    assert knn["top1"]["5"] > 60.0  # 3 colour-coded classes; chance is 33 %

    assert main(["linear", *common, "--lrs", "0.01", "0.1"]) == 0
    lin = json.loads((tmp_path / "linear.json").read_text())
    assert lin["best_lr"] in (0.01, 0.1) and set(lin["val_acc"]) == {"0.01", "0.1"} and lin["patch_mean"]
    assert 60.0 < lin["test_acc"] <= 100.0, lin  # 3 colour-coded classes; chance is 33 %

    assert main(["attention", *common, "--num-images", "3"]) == 0
    att = json.loads((tmp_path / "attention.json").read_text())
    assert att["num_heads"] == 2 and att["grid"] == [8, 8] and len(att["indices"]) == 3
    assert (tmp_path / "attention_maps.png").stat().st_size > 2_000

    out = capsys.readouterr().out
    assert "k-NN top-1" in out and "linear probe" in out and "attention maps" in out


def test_cli_errors(export, tmp_path, capsys):
    assert main(["knn", "--checkpoint", str(tmp_path / "missing"), "--dataset", "demo"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["knn", "--checkpoint", str(export["weights"])])  # no dataset
