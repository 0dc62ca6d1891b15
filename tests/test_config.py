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


# ------------------------------------------------------------------------------------------- ibot_head
def test_ibot_head_null_shares_the_dino_head_and_a_block_makes_a_separate_one(tmp_path):
    from dinov2.config import HeadConfig
    from dinov2.train.meta_arch import build_heads

    shared = load_config(None)
    assert shared.ibot_head is None and shared.ibot_loss_head() is shared.dino_head
    assert list(build_heads(8, shared.dino_head, shared.ibot_head)) == ["dino_head"]
    separate = load_config(None, ["ibot_head.out_dim=16", "ibot_head.hidden_dim=8", "ibot_head.bottleneck_dim=4"])
    assert separate.ibot_head == HeadConfig(out_dim=16, hidden_dim=8, bottleneck_dim=4)  # the rest: defaults
    assert separate.ibot_loss_head() is separate.ibot_head
    heads = build_heads(8, HeadConfig(out_dim=32, hidden_dim=8, bottleneck_dim=4), separate.ibot_head)
    assert list(heads) == ["dino_head", "ibot_head"]
    assert heads["ibot_head"].last_layer.out_features == 16 and heads["dino_head"].last_layer.out_features == 32
    # a YAML block on top of a shared base makes a head; null on top of a separate one shares again
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {REPO / 'configs/train/vits14.yaml'}\nibot_head:\n  out_dim: 1024\n")
    assert load_config(child).ibot_head == HeadConfig(out_dim=1024)
    assert load_config("train/vitl14", ["ibot_head=null"]).ibot_head is None
    with pytest.raises(ConfigError, match=r"ibot_head\.out_dimm.*did you mean 'ibot_head\.out_dim'"):
        load_config(None, ["ibot_head.out_dimm=8"])


def test_the_replaced_separate_head_flag_names_its_replacement(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("loss:\n  ibot_separate_head: true\n")
    for source in ((path, []), (None, ["loss.ibot_separate_head=false"])):
        with pytest.raises(ConfigError) as e:
            load_config(*source)
        msg = str(e.value)
        assert msg.startswith("loss.ibot_separate_head") and "\n" not in msg
        assert "was replaced by ibot_head (null: the iBOT loss uses the DINO head; a head block: a separate" in msg


def _older_saved_config(path: Path, separate: bool, **overrides) -> None:
    """``config.yaml`` as an older version saved it: every key, an ``ibot_head`` block always, and the flag."""
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.structured(load_config(None, [f"{k}={v}" for k, v in overrides.items()])))
    saved["ibot_head"] = {"out_dim": 4096, "hidden_dim": 512, "bottleneck_dim": 64, "nlayers": 2, "mlp_init": "fan_in"}
    saved["loss"]["ibot_separate_head"] = separate
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))


def test_a_run_saved_by_an_older_version_reads_the_flag_as_ibot_head(tmp_path):
    """A run directory's ``config.yaml`` from before ``ibot_head`` was optional: the flag's meaning is kept
    (true: the saved block is the head; false: the block was unused, the head is shared) where a saved run
    is read (resuming it, distilling from it, evaluating its export, passing it back as ``--config``)."""
    from dinov2.config import HeadConfig, load_run_config
    from dinov2.train.run_dir import check_run_dir, differing_run_keys

    for separate in (True, False):
        _older_saved_config(tmp_path / "config.yaml", separate, **{"train.output_dir": tmp_path})
        cfg = load_run_config(tmp_path / "config.yaml")
        want = HeadConfig(out_dim=4096, hidden_dim=512, bottleneck_dim=64, nlayers=2, mlp_init="fan_in")
        assert cfg.ibot_head == (want if separate else None)
        # dinov2-train --config RUN/config.yaml: the same file as a --config, with overrides on top
        assert load_config(tmp_path / "config.yaml", ["optim.epochs=3"]).ibot_head == cfg.ibot_head
        same_head = [f"ibot_head.{k}={v}" for k, v in vars(want).items()] if separate else []
        check_run_dir(load_config(None, [f"train.output_dir={tmp_path}", *same_head]))  # the same run: resumable
        # sharing or not is part of what a run directory's checkpoints are: switching is refused
        assert differing_run_keys(cfg, load_config(None, [] if separate else ["ibot_head.out_dim=8"]))
    assert load_run_config("train/vitl14") == load_config("train/vitl14")  # a preset (with _base_): as given
