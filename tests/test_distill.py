"""Distillation: frozen teacher stays bit-identical; distilled student beats the same student from scratch."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import cifar_small_overrides

from dinov2.config import load_config
from dinov2.distill.teacher_load import load_teacher
from dinov2.distributed.env import DistEnv
from dinov2.launch.run import train
from dinov2.train.checkpoint import CheckpointManager
from dinov2.train.export import export_backbone

STUDENT = [
    "model.arch=vit_small",
    "model.embed_dim=48",
    "model.depth=3",
    "model.num_heads=3",
    "model.patch_size=4",
    "model.img_size=32",
]
# a second, narrower student for the several-students-per-teacher-forward tests
EXTRA_STUDENT = (
    "distill.extra_students=[{name: narrow, model: {arch: vit_small, embed_dim: 8, depth: 1, num_heads: 2, "
    "patch_size: 4, img_size: 16, layerscale_init: 0.1}}]"
)


def _hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _config(run_dir, out, shared_data, extra=()):
    teacher_cfg = load_config(run_dir / "config.yaml")
    teacher_model = [f"distill.teacher_model.{k}={v}" for k, v in vars(teacher_cfg.model).items() if v is not None]
    return load_config(
        "tests/configs/cifar10_small_cpu.yaml",
        cifar_small_overrides(shared_data)
        + STUDENT
        + teacher_model
        + [f"train.output_dir={out}", "train.progress=false", "optim.epochs=4", *extra],
    )


# 250 iterations each; the distilled student's targets at teacher temperature 0.01: the CPU-minutes
# teacher's centred outputs at its training temperature (0.04) are nearly uniform (entropy ~5.2 of
# log K = 5.5), a sharper temperature keeps its ranking of the prototypes (docs/distillation.md)
SAME_STEPS = ["optim.epochs=10"]
SHARP_TARGETS = ["loss.teacher_temp=0.01", "loss.warmup_teacher_temp=0.01"]
# dinov3's student EMA (cosine 0.994 -> 1, no warm-up) over 250 iterations keeps exp(-sum(1 - m)) =
# exp(-0.003 * 250) = 47 % of the random initialisation in the exported EMA; the warm-up option
# min(m, (1 + t) / (10 + t)) follows the student closely instead (the recipe's other defaults apply)
SHORT_RUN_EMA = ["distill.student_ema_warmup=true"]


def test_distilled_student_beats_scratch_and_teacher_is_untouched(cifar_pretrained, shared_data, tmp_path):
    distill_cfg = _config(
        cifar_pretrained.run_dir,
        tmp_path / "distill",
        shared_data,
        [
            "distill.enabled=true",
            f"distill.teacher_checkpoint={cifar_pretrained.run_dir}",
            *SAME_STEPS,
            *SHARP_TARGETS,
            *SHORT_RUN_EMA,
        ],
    )
    teacher_before = _hash(load_teacher(distill_cfg))
    distilled = train(distill_cfg)
    assert _hash(load_teacher(distill_cfg)) == teacher_before  # the checkpoint on disk
    scratch = train(_config(cifar_pretrained.run_dir, tmp_path / "scratch", shared_data, SAME_STEPS))
    print(
        f"\nk-NN top-1 (k=20), same student, same {distilled.iterations} steps: "
        f"distilled {distilled.knn[20]:.2f}%  vs from scratch {scratch.knn[20]:.2f}%  "
        f"(teacher {cifar_pretrained.knn[20]:.2f}%)"
    )
    assert (tmp_path / "distill" / "student_backbone.safetensors").is_file()
    assert distilled.knn[20] > scratch.knn[20] + 2.0


def test_teacher_parameters_bit_identical_during_distillation(cifar_pretrained, shared_data, tmp_path):
    from dinov2.launch.run import build_meta_arch

    cfg = _config(
        cifar_pretrained.run_dir,
        tmp_path,
        shared_data,
        ["distill.enabled=true", f"distill.teacher_checkpoint={cifar_pretrained.run_dir}", "train.max_iterations=3"],
    )
    model = build_meta_arch(cfg, torch.device("cpu"))  # keyed by train.seed: the trainer's initial weights
    before = _hash(model.teacher)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    train(cfg)
    # the teacher inside the final distillation checkpoint (after 3 optimizer steps) has the same bytes
    trained = build_meta_arch(cfg, torch.device("cpu"))
    CheckpointManager(tmp_path / "checkpoints").load(tmp_path / "checkpoints" / "ckpt_00000003", trained, None)
    assert _hash(trained.teacher) == before
    assert _hash(trained.student) != _hash(model.student)  # while the student did move


def test_backbone_only_teacher_gets_made_frozen_heads(cifar_pretrained, shared_data, tmp_path):
    # export only the teacher backbone: the heads must be made (seeded, frozen)
    source = load_teacher(
        _config(
            cifar_pretrained.run_dir,
            tmp_path / "a",
            shared_data,
            ["distill.enabled=true", f"distill.teacher_checkpoint={cifar_pretrained.run_dir}"],
        )
    )
    weights = export_backbone(source.backbone, tmp_path / "teacher.safetensors", DistEnv())
    cfg = _config(
        cifar_pretrained.run_dir,
        tmp_path / "b",
        shared_data,
        [
            "distill.enabled=true",
            f"distill.teacher_checkpoint={weights}",
            "distill.head_seed=3",
            "train.max_iterations=4",
        ],
    )
    first, second = load_teacher(cfg), load_teacher(cfg)
    assert _hash(first) == _hash(second)  # the made heads are a function of distill.head_seed
    assert _hash(first.backbone) == _hash(source.backbone)
    assert not torch.equal(first.dino_head.mlp[0].weight, source.dino_head.mlp[0].weight)
    result = train(cfg)
    assert result.iterations == 4 and (tmp_path / "b" / "student_backbone.safetensors").is_file()
    assert _hash(load_teacher(cfg)) == _hash(first)


# ----------------------------------------------------------------------------- FSDP and exact resume
def _tiny_teacher_run(root):
    from tiny_config import TINY

    run = root / "tiny_teacher"
    train(
        load_config(
            "train/demo",
            TINY + [f"train.output_dir={run}", "train.max_iterations=2", "eval.final_knn=false"],
        )
    )
    return run


def _tiny_distill(run, out, extra=()):
    from tiny_config import TINY

    student = ["model.embed_dim=16", "model.num_heads=2"]  # narrower than the 32-wide teacher
    return (
        TINY
        + student
        + [
            "distill.enabled=true",
            f"distill.teacher_checkpoint={run}",
            f"train.output_dir={out}",
            "eval.final_knn=false",
            "model.drop_path_rate=0.1",
            *extra,
        ]
    )


def test_distillation_resumes_exactly(tmp_path):
    from dinov2.distributed.stop import StopRequest
    from dinov2.launch.run import build_meta_arch

    run = _tiny_teacher_run(tmp_path)
    common = ["train.max_iterations=4", "train.checkpoint_every=100", EXTRA_STUDENT]
    stopped = load_config("train/demo", _tiny_distill(run, tmp_path / "stopped", common))
    stop = StopRequest()
    stop.request("test")
    assert train(stopped, stop).iterations == 1
    assert train(stopped).iterations == 4
    train(load_config("train/demo", _tiny_distill(run, tmp_path / "straight", common)))
    states = []
    for name in ("stopped", "straight"):
        model = build_meta_arch(stopped, torch.device("cpu"))
        ckpts = CheckpointManager(tmp_path / name / "checkpoints")
        ckpts.load(ckpts.latest(), model, None)
        states.append(model.state_dict())
    assert any(k.startswith("student_ema.") for k in states[0])
    assert any(k.startswith("extra_students.narrow.") for k in states[0])
    assert any(k.startswith("extra_emas.narrow.") for k in states[0])
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


@pytest.mark.slow  # several processes or a whole benchmark: the full suite, not the < 3 min fast loop
def test_two_process_fsdp_distillation(tmp_path):
    import os
    import subprocess
    import sys

    from dinov2.launch.run import build_meta_arch

    run = _tiny_teacher_run(tmp_path)
    out = tmp_path / "fsdp"
    args = _tiny_distill(
        run,
        out,
        [
            "train.max_iterations=3",
            "distributed.fsdp=true",
            "distributed.param_dtype=fp32",
            "data.batch_size_per_gpu=4",
            EXTRA_STUDENT,  # a second student, sharded like the first
        ],
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "dinov2.launch.distill_cli", "--config", "train/demo", *args]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "student_backbone.safetensors").is_file()
    cfg = load_config("train/demo", args)
    initial = build_meta_arch(cfg, torch.device("cpu"))
    trained = build_meta_arch(cfg, torch.device("cpu"))
    CheckpointManager(out / "checkpoints").load(out / "checkpoints" / "ckpt_00000003", trained, None)
    assert _hash(trained.teacher) == _hash(initial.teacher)  # sharded, trained 3 steps: teacher untouched
    assert _hash(trained.student) != _hash(initial.student)
    assert _hash(trained.extra_students["narrow"]) != _hash(initial.extra_students["narrow"])
    assert (out / "narrow_backbone.safetensors").is_file()


# ------------------------------------------------------------------- dinov3's distillation recipe
def test_distillation_defaults_are_dinov3s():
    """dinov3 configs/train/dinov3_vitl16_lvd1689m_distilled.yaml ``schedules``: teacher temperature
    constant 0.07, weight decay constant 0.04, no prototype-layer freeze, the students' EMA on a cosine
    0.994 -> 1.0 (no warm-up), layer-wise lr decay 0.99; the self-distillation schedules are unchanged."""
    from dinov2.train.schedules import Schedules
    from dinov2.train.trainer import make_optimizer

    distill = load_config(None, ["distill.enabled=true", "optim.epochs=10", "optim.epoch_length=100"])
    s = Schedules.from_config(distill, global_batch=1024, total_iterations=1000)
    for it in (0, 1, 500, 999):
        assert s.at(it).teacher_temp == 0.07 and s.at(it).weight_decay == pytest.approx(0.04)
        assert not s.at(it).freeze_last_layer
    assert s.at(0).momentum == pytest.approx(0.994) and s.at(500).momentum == pytest.approx(0.997)
    assert s.at(999).momentum == pytest.approx(1.0, abs=1e-6)
    ssl = Schedules.from_config(load_config(None, ["optim.epochs=10", "optim.epoch_length=100"]), 1024, 1000)
    assert ssl.at(0).teacher_temp == pytest.approx(0.04) and ssl.at(0).freeze_last_layer
    assert ssl.at(500).weight_decay == pytest.approx(0.12) and ssl.at(0).momentum == pytest.approx(0.992)

    from tiny_config import TINY_MODEL

    from dinov2.distill.meta_arch import DistillMetaArch
    from dinov2.train.meta_arch import SSLMetaArch

    cfg = load_config(None, TINY_MODEL + ["distill.enabled=true"])
    model = DistillMetaArch(cfg, SSLMetaArch(cfg).teacher)
    groups = make_optimizer(model, cfg, torch.device("cpu")).param_groups
    depth = cfg.model.depth
    assert {g["lr_multiplier"] for g in groups if not g["is_last_layer"]} >= {0.99 ** (depth + 1 - i) for i in (1, 2)}


def test_distilled_student_sees_its_global_crops_unmasked():
    """dinov3 ssl_meta_arch.get_student_output: ``masks=[masks if not distillation else None, None]``:
    the student's loss does not depend on its mask token (the old code masked the student's crops);
    ``distill.student_masks=true`` masks them again. The iBOT term still compares the drawn patches."""
    from tiny_config import TINY

    from dinov2.distill.meta_arch import DistillMetaArch
    from dinov2.train.meta_arch import SSLMetaArch
    from dinov2.train.trainer import build_loader

    losses = {}
    for masked in (False, True):
        cfg = load_config("train/demo", TINY + ["distill.enabled=true", f"distill.student_masks={masked}"])
        torch.manual_seed(0)
        model = DistillMetaArch(cfg, SSLMetaArch(cfg).teacher).eval()
        batch = next(iter(build_loader(cfg, DistEnv(), torch.device("cpu"), 0)))
        assert batch["mask_indices"].numel() > 0
        with torch.no_grad():
            targets = model.teacher_targets(batch["global_crops"], batch["mask_indices"], 0.07)[:2]
            first = model.student_losses(model.student, batch, *targets).parts
            model.student.backbone.mask_token.add_(10.0)
            second = model.student_losses(model.student, batch, *targets).parts
        losses[masked] = (first["ibot"], second["ibot"])
        assert first["ibot"] > 0
    assert torch.equal(*losses[False])  # unmasked: the mask token is never used
    assert not torch.equal(*losses[True])


# ----------------------------------------------------------------- several students, one teacher pass


def test_extra_students_share_one_teacher_forward(tmp_path):
    from dinov2.launch.run import build_meta_arch
    from dinov2.train.trainer import build_loader

    run = _tiny_teacher_run(tmp_path)
    cfg = load_config("train/demo", _tiny_distill(run, tmp_path / "out", [EXTRA_STUDENT]))
    model = build_meta_arch(cfg, torch.device("cpu"))
    calls = {"teacher": 0, "student": 0, "narrow": 0}
    for name, network in [("teacher", model.teacher), *model.trained_networks().items()]:
        network.backbone.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    batch = next(iter(build_loader(cfg, DistEnv(), torch.device("cpu"), 0)))
    step = model(batch, teacher_temp=0.04)
    assert calls == {"teacher": 1, "student": 1, "narrow": 1}
    assert {"loss", "dino", "ibot", "koleo", "narrow/loss", "narrow/dino", "narrow/koleo"} <= set(step.parts)
    # the summed loss is the two students' losses, and each equals that student's loss computed alone
    torch.testing.assert_close(step.loss.detach(), step.parts["loss"] + step.parts["narrow/loss"])
    targets = model.teacher_targets(batch["global_crops"], batch["mask_indices"], 0.04)[:2]
    alone = model.student_losses(model.extra_students["narrow"], batch, *targets)
    torch.testing.assert_close(alone.parts["loss"], step.parts["narrow/loss"], rtol=0, atol=0)


def test_extra_student_leaves_the_main_student_exactly_as_alone(tmp_path):
    """Disjoint parameters, per-network clipping: adding a student changes nothing for the first one;
    both exports are written and the extra student moved."""
    from safetensors.torch import load_file

    run = _tiny_teacher_run(tmp_path)
    common = ["train.max_iterations=4", "eval.final_knn=true", "eval.knn_k=[5]"]
    two = train(load_config("train/demo", _tiny_distill(run, tmp_path / "two", [*common, EXTRA_STUDENT])))
    one = train(load_config("train/demo", _tiny_distill(run, tmp_path / "one", common)))
    main_two, main_one = load_file(two.exported), load_file(one.exported)
    assert main_two.keys() == main_one.keys()
    for key in main_one:
        assert torch.equal(main_two[key], main_one[key]), key
    assert two.knn == one.knn and set(two.knns) == {"student", "narrow"} and 5 in two.knns["narrow"]
    narrow = load_file(two.exports["narrow"])
    assert two.exports["narrow"].name == "narrow_backbone.safetensors"
    assert narrow["cls_token"].shape[-1] == 8
    # evaluation and curation rebuild each export from its own config file; the run dir means the main student
    from dinov2.eval.backbone_io import find_weights, load_backbone

    backbone, narrow_cfg = load_backbone(two.exports["narrow"])
    assert backbone.embed_dim == 8 and narrow_cfg.model.depth == 1 and not narrow_cfg.distill.extra_students
    assert torch.equal(backbone.cls_token, narrow["cls_token"])
    assert find_weights(tmp_path / "two") == two.exported
    assert load_backbone(tmp_path / "two")[0].embed_dim == 16
    logged = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 4 and all('"narrow/loss"' in line and '"narrow/grad_norm"' in line for line in logged)
    alone = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(a)["loss"] for a in alone] == [json.loads(b)["loss"] for b in logged]


@pytest.mark.parametrize("name", ["student", "../up", "", "narrow_ema"])
def test_extra_student_names_are_checked(tmp_path, name):
    from dinov2.config import ConfigError
    from dinov2.launch.run import build_meta_arch

    run = _tiny_teacher_run(tmp_path)
    extra = EXTRA_STUDENT.replace("name: narrow", f"name: '{name}'")
    cfg = load_config("train/demo", _tiny_distill(run, tmp_path / "out", [extra]))
    with pytest.raises(ConfigError, match="extra_students"):
        build_meta_arch(cfg, torch.device("cpu"))
