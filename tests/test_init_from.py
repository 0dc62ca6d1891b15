"""``dinov2-train --init-from RUN_DIR`` (issue 13, item 8): a tiny 24 px run, then a 32 px phase from it.

The phase starts from the run's newest checkpoint — student, teacher and both heads, every position
embedding resampled once to the new grid — trains and exports; bad input is one line and exit 2 with
nothing written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_config import TINY

from dinov2.config import load_config
from dinov2.launch.run import build_meta_arch
from dinov2.launch.train_cli import main
from dinov2.models.pos_embed import interpolate_pos_embed
from dinov2.train.init_from import init_from_run, read_weights, resample_pos_embeds

PHASE1 = [
    "model.img_size=24",
    "data.crops.global_crops_size=24",
    "data.dataset.demo_image_size=32",
    "train.max_iterations=2",
    "train.checkpoint_every=2",
    "eval.final_knn=false",
]
PHASE2 = [
    "model.img_size=32",
    "data.crops.global_crops_size=32",
    "data.dataset.demo_image_size=32",
    "train.max_iterations=2",
    "train.checkpoint_every=2",
    "eval.final_knn=false",
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run24")
    assert main(["--config", "train/demo", *TINY, *PHASE1, f"train.output_dir={run}"]) == 0
    return run


def test_high_resolution_phase_starts_from_the_run_and_exports(first_run, tmp_path, capsys):
    phase = tmp_path / "run32"
    overrides = [*TINY, *PHASE2, f"train.output_dir={phase}"]
    cfg = load_config("train/demo", overrides)
    cfg.train.init_from = str(first_run)
    model = build_meta_arch(cfg, torch.device("cpu"))
    source = init_from_run(model, cfg)
    assert source == first_run / "checkpoints" / "ckpt_00000002"
    saved = read_weights(source)
    state = model.state_dict()
    assert {k for k in state if k.startswith(("student.", "teacher."))} == set(saved)
    for key, value in saved.items():
        if key.endswith("pos_embed"):
            assert value.shape == (1, 1 + 6 * 6, 32) and state[key].shape == (1, 1 + 8 * 8, 32)
            assert torch.equal(state[key], interpolate_pos_embed(value, 8, 8, "ours"))
        else:
            assert torch.equal(state[key], value), key
    assert not torch.equal(saved["student.dino_head.mlp.0.weight"], saved["teacher.dino_head.mlp.0.weight"])

    # the teacher held still (EMA momentum 1): the phase's exported teacher is the run's, resampled
    frozen_teacher = ["optim.momentum_teacher=1.0", "optim.final_momentum_teacher=1.0"]
    assert main(["--config", "train/demo", "--init-from", str(first_run), *overrides, *frozen_teacher]) == 0
    exported = load_file(str(phase / "teacher_backbone.safetensors"))
    assert exported["pos_embed"].shape == (1, 65, 32)
    for key, value in exported.items():
        assert torch.equal(value, state[f"teacher.backbone.{key}"]), key
    assert "init_from: " + str(first_run) in (phase / "config.yaml").read_text()
    assert "finished 2 iterations" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "empty", "mismatch", "same_dir"])
def test_bad_init_from_is_one_line_exit_2_and_writes_nothing(first_run, tmp_path, capsys, case):
    out = tmp_path / "out"
    source, extra = first_run, []
    if case == "missing":
        source = tmp_path / "nope"
    elif case == "empty":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "mismatch":
        extra = ["model.embed_dim=48"]
    else:
        out = first_run
    argv = ["--config", "train/demo", "--init-from", str(source), *TINY, *PHASE2, *extra, f"train.output_dir={out}"]
    before = sorted(p.name for p in first_run.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dinov2-train: error: "), err
    expected = {"missing": "no such directory", "empty": "no checkpoint", "mismatch": "architecture mismatch"}
    assert expected.get(case, "train.output_dir") in err[0]
    assert not out.exists() or out == first_run
    assert sorted(p.name for p in first_run.rglob("*")) == before


@pytest.mark.parametrize("size", ["s", "b", "l", "g"])
def test_highres_presets_continue_their_base_run(size):
    """Each ``vit*14_highres`` preset fits the weights of its base preset's run (same keys and shapes but
    the position-embedding grid) and is the paper's phase: 518 px global crops for 10k iterations."""
    from dinov2.train.init_from import _target_shapes
    from dinov2.train.trainer import total_iterations

    base = load_config(f"train/vit{size}14")
    phase = load_config(f"train/vit{size}14_highres")
    assert (phase.model.img_size, phase.data.crops.global_crops_size) == (518, 518)
    assert phase.data.crops.local_crops_size == base.data.crops.local_crops_size == 98
    assert total_iterations(phase) == 10_000
    assert (phase.dino_head, phase.ibot_head) == (base.dino_head, base.ibot_head)
    want, have = _target_shapes(phase), _target_shapes(base)
    assert set(want) == set(have)
    differ = {k for k in want if want[k] != have[k]}
    assert differ == {"student.backbone.pos_embed", "teacher.backbone.pos_embed"}
    assert want["teacher.backbone.pos_embed"][1] == 1 + 37 * 37
    o = phase.optim  # dinov3's high-resolution adaptation schedules (see the preset's header)
    assert (o.base_lr, o.min_lr, o.weight_decay, o.weight_decay_end) == (1.25e-5, 1.25e-5, 0.04, 0.04)
    assert (o.momentum_teacher, o.final_momentum_teacher, o.freeze_last_layer_epochs) == (0.999, 0.999, 0)
    assert (phase.loss.teacher_temp, phase.loss.warmup_teacher_temp) == (0.07, 0.07)


def test_a_started_phase_resumes_without_reading_the_source_again(first_run, tmp_path):
    phase = tmp_path / "run32"
    overrides = [*TINY, *PHASE2, "train.max_iterations=1", "train.checkpoint_every=1", f"train.output_dir={phase}"]
    assert main(["--config", "train/demo", "--init-from", str(first_run), *overrides]) == 0
    gone = tmp_path / "moved"
    first_run.rename(gone)  # the source is no longer there: resuming must not need it
    try:
        more = [*overrides[:-3], "train.max_iterations=2", "train.checkpoint_every=1", f"train.output_dir={phase}"]
        assert main(["--config", "train/demo", "--init-from", str(first_run), *more]) == 0
    finally:
        gone.rename(first_run)
    assert (phase / "checkpoints" / "ckpt_00000002").is_dir()


@pytest.mark.slow
def test_phase_under_fsdp_on_two_ranks_loads_the_same_weights(first_run, tmp_path):
    """The full tensors read from the checkpoint are sharded onto 2 gloo ranks (FSDP2): the exported teacher,
    held still, is the run's resampled teacher bit for bit."""
    phase = tmp_path / "run32"
    args = [
        *TINY, *PHASE2, "data.batch_size_per_gpu=4", "distributed.fsdp=true", "distributed.param_dtype=fp32",
        "train.max_iterations=1", "optim.momentum_teacher=1.0", "optim.final_momentum_teacher=1.0",
        f"train.output_dir={phase}",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "dinov2.launch.train_cli", "--config", "train/demo", "--init-from", str(first_run), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = resample_pos_embeds(read_weights(first_run / "checkpoints" / "ckpt_00000002"), 8, "ours")
    for key, value in load_file(str(phase / "teacher_backbone.safetensors")).items():
        assert torch.equal(value, saved[f"teacher.backbone.{key}"]), key
