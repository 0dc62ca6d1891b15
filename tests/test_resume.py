"""Resuming a run: it trained (parameters moved from the seeded initial state), it ends bit-identical to
the uninterrupted run, and it consumed the same data stream sample for sample — at the same global
batch, at another global batch and at another world size. The stream is recorded by
``tests/train_driver.py`` (a spy around ``train_step`` that calls through)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_state
from tiny_config import TINY
from train_driver import read_stream, stream_spy

from dinov2.config import load_config
from dinov2.distributed.stop import StopRequest
from dinov2.launch.run import build_meta_arch, train
from dinov2.train import trainer
from dinov2.train.checkpoint import CheckpointManager, read_progress
from dinov2.train.metrics import read_metrics
from dinov2.train.schedules import Schedules

TESTS = Path(__file__).resolve().parent
COMMON = TINY + [
    "train.checkpoint_every=100",
    "train.export_teacher=false",
    "eval.final_knn=false",
    "model.drop_path_rate=0.2",  # stochastic depth draws must resume too
    "optim.warmup_epochs=0",  # a non-zero learning rate from the first step
    "optim.freeze_last_layer_epochs=0",
]


def _run(monkeypatch, out: Path, overrides: list[str], stop_after: int | None = None):
    """``train()`` in this process with the stream recorded to ``out/stream_rank0.jsonl``."""
    cfg = load_config("train/demo", COMMON + overrides + [f"train.output_dir={out}"])
    stop, steps = (StopRequest() if stop_after is not None else None), []

    def after_step():
        steps.append(1)
        if stop is not None and len(steps) >= stop_after:
            stop.request("test")

    out.mkdir(parents=True, exist_ok=True)
    with monkeypatch.context() as m:
        m.setattr(trainer, "train_step", stream_spy(trainer.train_step, out / "stream_rank0.jsonl", after_step))
        return cfg, train(cfg, stop)


def _assert_trained(cfg, state: dict[str, torch.Tensor]) -> None:
    """Every student and teacher tensor moved from the initial weights the trainer builds (seeded)."""
    initial = build_meta_arch(cfg, torch.device("cpu")).state_dict()
    params = [k for k in initial if k.startswith(("student.", "teacher.")) and initial[k].is_floating_point()]
    still = [k for k in params if torch.equal(state[k], initial[k])]
    assert not still, f"{len(still)} of {len(params)} tensors never moved, e.g. {still[:3]}"


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """Stop after 2 of 4 steps, resume: the same 32 samples in the same order, the same final weights,
    and those weights are trained ones."""
    cfg, straight = _run(monkeypatch, tmp_path / "straight", ["train.max_iterations=4"])
    _, first = _run(monkeypatch, tmp_path / "resumed", ["train.max_iterations=4"], stop_after=2)
    assert first.interrupted and first.iterations == 2
    _, second = _run(monkeypatch, tmp_path / "resumed", ["train.max_iterations=4"])
    assert not second.interrupted and second.iterations == straight.iterations == 4
    expected = read_stream(tmp_path / "straight")
    assert [p for p, _ in expected] == list(range(32))
    assert read_stream(tmp_path / "resumed") == expected
    state = checkpoint_state(cfg, tmp_path / "straight" / "checkpoints")
    _assert_trained(cfg, state)
    _assert_same_state(checkpoint_state(cfg, tmp_path / "resumed" / "checkpoints"), state)
    # each step ran at its own iteration's schedule values (logged with it)
    schedules = Schedules.from_config(cfg, cfg.data.batch_size_per_gpu, 4)
    logged = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["iteration"] for r in logged] == list(range(4))
    for record in logged:
        values = schedules.at(record["iteration"])
        assert (record["lr"], record["teacher_temp"]) == (values.lr, values.teacher_temp), record


def test_resume_at_another_global_batch_continues_the_sample_stream(tmp_path, monkeypatch):
    """Saved at global batch 8 after 2 steps (position 16), resumed at global batch 4: the run goes on
    from sample 16, not from ``iteration × new batch`` = 8 — what a resume at another world size needs."""
    _run(monkeypatch, tmp_path / "straight", ["train.max_iterations=4"])
    cfg, first = _run(monkeypatch, tmp_path / "resumed", ["train.max_iterations=6"], stop_after=2)
    assert first.interrupted
    saved = CheckpointManager(tmp_path / "resumed" / "checkpoints")
    assert read_progress(saved.latest())["sample_position"] == 16
    _, second = _run(monkeypatch, tmp_path / "resumed", ["train.max_iterations=6", "data.batch_size_per_gpu=4"])
    assert second.iterations == 6
    assert read_stream(tmp_path / "resumed") == read_stream(tmp_path / "straight")
    # the final checkpoint's position is the global samples consumed: 16 + 4 steps × 4
    assert read_progress(saved.latest())["sample_position"] == 32
    _assert_trained(cfg, checkpoint_state(cfg, tmp_path / "resumed" / "checkpoints"))


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(sys.path))


def _driver(args: list[str]) -> list[str]:
    return [sys.executable, str(TESTS / "train_driver.py"), *args, "--config", "train/demo"]


@pytest.mark.slow  # torchrun start-up of 2 ranks: ~30 s on 2 shared cores (the fast test above catches the same bug)
def test_resume_at_world_size_two_continues_the_sample_stream(tmp_path, monkeypatch):
    """Saved by one process (batch 8) after 2 steps, resumed by 2 torchrun ranks (8 each, global 16):
    the ranks together read samples 16…47, each exactly once, as the uninterrupted run does."""
    overrides = ["train.max_iterations=4", "distributed.param_dtype=fp32"]
    cfg, _ = _run(monkeypatch, tmp_path / "straight", ["train.max_iterations=6"])
    _run(monkeypatch, tmp_path / "resumed", overrides, stop_after=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += _driver([*COMMON, *overrides, f"train.output_dir={tmp_path / 'resumed'}"])[1:]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = read_stream(tmp_path / "resumed")
    assert [p for p, _ in resumed] == list(range(48))
    assert resumed == read_stream(tmp_path / "straight")
    _assert_trained(cfg, checkpoint_state(cfg, tmp_path / "resumed" / "checkpoints"))


LOSS_KEYS = ("loss", "dino", "ibot", "koleo", "grad_norm", "teacher_entropy")


def test_killed_mid_run_resumes_exactly(tmp_path):
    """SIGKILL one step past the checkpoint at iteration 2 (the driver holds there and says so in a
    file), resume: bit-identical weights and losses to the uninterrupted run, same sample stream."""
    common = [*COMMON, "train.max_iterations=5", "train.checkpoint_every=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_driver([*common, f"train.output_dir={straight}"]), env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(
        _driver(["--hold-after-checkpoint", "2", *common, f"train.output_dir={killed}"]),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not (killed / "holding").exists():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before reaching its hold"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert CheckpointManager(killed / "checkpoints").latest().name == "ckpt_00000002"
    consumed = read_stream(killed)
    assert [p for p, _ in consumed] == list(range(24))  # three steps: one past the checkpoint
    subprocess.run(_driver([*common, f"train.output_dir={killed}"]), env=_env(), check=True, capture_output=True)

    cfg = load_config("train/demo", common)
    state = checkpoint_state(cfg, straight / "checkpoints")
    _assert_trained(cfg, state)
    _assert_same_state(checkpoint_state(cfg, killed / "checkpoints"), state)
    # the step past the checkpoint is redone from the checkpoint: samples 16..23 appear twice
    expected = read_stream(straight)
    assert sorted(set(read_stream(killed))) == expected and len(read_stream(killed)) == len(expected) + 8
    log_a, log_b = read_metrics(straight / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["iteration"] for r in log_a] == list(range(5))
    by_iteration = {r["iteration"]: r for r in log_b}  # the resumed run's records win
    for ra in log_a:
        assert {k: ra[k] for k in LOSS_KEYS} == {k: by_iteration[ra["iteration"]][k] for k in LOSS_KEYS}


@pytest.fixture(autouse=True)
def _no_process_group():
    yield
    assert not torch.distributed.is_initialized()
