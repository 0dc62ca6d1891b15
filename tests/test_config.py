"""Typed config: presets load, overrides apply, unknown keys name themselves and the closest valid key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinov2.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs" / "train").glob("*.yaml")) + sorted((REPO / "configs" / "distill").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_preset_by_name_and_overrides():
    cfg = load_config("train/vits14", ["optim.base_lr=0.001", "data.crops.local_crops_number=6", "model.arch=vit_base"])
    assert cfg.optim.base_lr == 0.001
    assert cfg.data.crops.local_crops_number == 6
    assert cfg.model.arch == "vit_base"


def test_unknown_override_names_key_and_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config("train/demo", ["optim.base_lrr=0.1"])
    msg = str(e.value)
    assert "optim.base_lrr" in msg and "optim.base_lr" in msg and "\n" not in msg


def test_unknown_yaml_key_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: vit_small\n  drop_path_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"model\.drop_path_rat.*did you mean 'model\.drop_path_rate'"):
        load_config(path)


def test_unknown_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  base_lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        load_config(path)


def test_bad_value_type():
    with pytest.raises(ConfigError, match="optim.base_lr"):
        load_config("train/demo", ["optim.base_lr=fast"])


def test_base_inheritance(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {REPO / 'configs/train/demo.yaml'}\noptim:\n  epochs: 3\n")
    cfg = load_config(child)
    assert cfg.optim.epochs == 3 and cfg.data.dataset.kind == "demo"


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/config.yaml")


def test_three_student_distillation_preset():
    import torch

    from dinov2.models import build_backbone

    cfg = load_config("distill/vitg14_to_vits14_vitb14_vitl14")
    assert cfg.distill.enabled and cfg.distill.teacher_model.arch == "vit_giant2"
    assert [s.name for s in cfg.distill.extra_students] == ["vitb14", "vitl14"]
    models = [cfg.model] + [s.model for s in cfg.distill.extra_students]
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in build_backbone(m).parameters()) / 1e6 for m in models]
    # ViT-S/14, B/14, L/14 at 224 px (the counts measured for the pretraining presets)
    assert [round(s, 1) for s in sizes] == [21.6, 85.7, 303.2], sizes
    assert {m.patch_size for m in models} == {cfg.distill.teacher_model.patch_size} == {14}
