"""dinov2.distributed on CPU with gloo: rank/world from torchrun or SLURM, the process group's life
cycle, the cross-rank stop request, data-parallel equivalence and DCP checkpoints across world sizes.

The multi-process tests share one 2-rank ``dinov2-train`` run under torchrun (module fixture):

* 2 ranks × batch 4 for K=4 steps == 1 process × batch 8 (fp32 FSDP parameters, no iBOT masks — they
  are seeded per rank batch —, no KoLeo — it is per rank batch —, no stochastic depth; Sinkhorn-Knopp
  centering, gradient clipping and the EMA included): max |Δ| over every parameter and buffer
  ≤ ``EQUIV_ATOL`` (the sums are only reordered, so the difference is float rounding);
* its DCP checkpoint (saved by 2 ranks) loads bit-exactly at world size 1 (plain and FSDP) and 3
  (FSDP, torchrun), model and optimizer, and training resumes from it at world size 3.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import checkpoint_state
from tiny_config import TINY

from dinov2.config import load_config
from dinov2.distributed.env import (
    DistEnv,
    distributed_session,
    first_host,
    read_env,
    setup_distributed,
    shutdown_distributed,
    slurm_rendezvous,
)
from dinov2.distributed.parallelize import clip_grad_norm, is_checkpointed, parallelize
from dinov2.distributed.stop import StopRequest
from dinov2.launch.run import build_meta_arch, train
from dinov2.train.checkpoint import CheckpointManager, saved_keys

TESTS = Path(__file__).resolve().parent
K = 4  # training steps compared
EQUIV_ATOL = 1e-5  # max |param(2 ranks × b) − param(1 rank × 2b)| after K steps, fp32

# ------------------------------------------------------------------------------ environment parsing


def test_read_env_torchrun_wins_over_slurm():
    env = read_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2", "SLURM_PROCID": "0"})
    assert env == DistEnv(rank=3, local_rank=1, world_size=8, local_world_size=2, source="torchrun")
    assert env.distributed and not env.is_main


def test_read_env_slurm_step():
    env = read_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "8",
            "SLURM_STEP_NUM_TASKS": "6",
            "SLURM_STEP_ID": "0",
            "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
        }
    )
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.source) == (5, 1, 6, 2, "slurm")


def test_read_env_slurm_batch_script_is_one_process():
    # the batch script has SLURM_PROCID=0 and SLURM_NTASKS=N but is a single process (no job step)
    env = read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"})
    assert env == DistEnv()


def test_read_env_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="not in"):
        read_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        read_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_first_host_and_rendezvous():
    assert first_host("node[003-005,7],gpu1") == "node003"
    assert first_host("a,b") == "a"
    assert first_host("single") == "single"
    addr, port = slurm_rendezvous({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "1234"})
    assert addr == "n1" and 20000 <= port < 40000
    assert slurm_rendezvous({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "1234"})[1] == port  # every task
    requeued = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "1234", "SLURM_RESTART_COUNT": "1"}
    assert 20000 <= slurm_rendezvous(requeued)[1] < 40000 and slurm_rendezvous(requeued)[1] != port
    assert slurm_rendezvous({"SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "1235"})[1] != port
    assert slurm_rendezvous({"MASTER_ADDR": "h", "MASTER_PORT": "29500", "SLURM_JOB_ID": "1"}) == ("h", 29500)


# ------------------------------------------------------------------------------------- process group


def test_single_process_group_for_fsdp_at_world_size_one():
    assert not dist.is_initialized()
    assert setup_distributed("gloo", environ={}) == DistEnv()  # one process, no FSDP: no group
    with distributed_session("gloo", always=True) as env:
        assert env.owns_process_group and env.backend == "gloo"
        assert dist.is_initialized() and dist.get_world_size() == 1
        # a group that already exists is reused and left alone
        inner = setup_distributed("gloo", always=True, environ={})
        assert not inner.owns_process_group
        shutdown_distributed(inner)
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_session_shuts_down_after_an_error():
    with pytest.raises(KeyError), distributed_session("gloo", always=True):
        raise KeyError("boom")
    assert not dist.is_initialized()


def test_stop_request_from_a_signal_restores_the_handler():
    stop = StopRequest(check_every=2)
    before = signal.getsignal(signal.SIGUSR2)
    with stop.handling([signal.SIGUSR2]):
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested and stop.signum == signal.SIGUSR2 and "SIGUSR2" in stop.reason
        assert not stop.agreed(3)  # not a check iteration
        assert stop.agreed(4)
    assert signal.getsignal(signal.SIGUSR2) is before


def test_fsdp_world_size_one_matches_plain_model_and_clips_globally(tmp_path):
    """FSDP2 at world size 1 (fp32) with selective activation checkpointing: same loss, same global
    grad norm and same clipped grads as the plain model."""
    overrides = ["distributed.param_dtype=fp32", "distributed.fsdp=true"]
    overrides += ["distributed.activation_checkpointing=selective"]
    cfg = load_config("train/demo", TINY + overrides)
    from dinov2.data import build_train_loader

    batch = next(iter(build_train_loader(cfg.data, cfg.model.patch_size)))
    torch.manual_seed(0)
    plain = build_meta_arch(cfg, torch.device("cpu")).train()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    loss = plain(batch, teacher_temp=0.04).loss
    loss.backward()
    norm = clip_grad_norm(plain.student, 1.0)
    with distributed_session("gloo", always=True) as env:
        torch.manual_seed(0)
        sharded = build_meta_arch(cfg, torch.device("cpu"))
        sharded.load_state_dict(state)
        parallelize(sharded, cfg.distributed, env)
        assert [is_checkpointed(b) for b in sharded.student.backbone.blocks] == [True, False]
        assert not any(is_checkpointed(b) for b in sharded.teacher.backbone.blocks)
        sharded.train()
        sharded_loss = sharded(batch, teacher_temp=0.04).loss
        sharded_loss.backward()
        sharded_norm = clip_grad_norm(sharded.student, 1.0)
        grads = {n: p.grad.full_tensor() for n, p in sharded.student.named_parameters() if p.grad is not None}
    torch.testing.assert_close(sharded_loss, loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(sharded_norm, norm, rtol=1e-5, atol=0)
    assert norm > 1.0  # clipping was active
    for name, p in plain.student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode, recomputed", [("selective", [0, 2]), ("full", [0, 1, 2])])
def test_activation_checkpointing_recomputes_its_blocks_and_changes_no_gradient(monkeypatch, mode, recomputed):
    """A tiny ViT (packed global + local crops, efficient stochastic depth) with its blocks' forwards
    wrapped by ``apply_activation_checkpointing``: the chosen blocks run their forward a second time in
    backward, the gradients are bit-identical to the unwrapped model's (the recomputation replays the
    RNG, so it drops the same samples), the parameter names and ``state_dict`` keys are unchanged, and
    ``none`` removes the wrappers again."""
    from dinov2.distributed.parallelize import apply_activation_checkpointing
    from dinov2.layers.block import Block
    from dinov2.models import create_vit

    torch.manual_seed(0)
    vit = create_vit(
        "vit_small", embed_dim=32, depth=3, num_heads=2, patch_size=4, img_size=16, layerscale_init=0.5,
        drop_path_rate=0.4, drop_path_mode="efficient",
    ).train()  # fmt: skip
    crops = [torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)]
    runs: list[int] = []
    forward = Block.forward

    def counted(self, *args, **kwargs):
        runs.append(next(i for i, b in enumerate(vit.blocks) if b is self))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Block, "forward", counted)

    def grads() -> dict[str, torch.Tensor]:
        vit.zero_grad(set_to_none=True)
        runs.clear()
        torch.manual_seed(1)  # the same stochastic-depth draws
        outs = vit(crops)
        sum((o["cls"] ** 2).mean() + o["patch"].sin().mean() for o in outs).backward()
        return {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}

    keys = list(vit.state_dict())
    plain = grads()
    assert runs == [0, 1, 2]
    apply_activation_checkpointing(vit, mode)
    checkpointed = grads()
    assert sorted(runs) == sorted([0, 1, 2] + recomputed)
    assert list(vit.state_dict()) == keys and list(checkpointed) == list(plain)
    for name, grad in plain.items():
        assert torch.equal(checkpointed[name], grad), name
    apply_activation_checkpointing(vit, "none")
    grads()
    assert runs == [0, 1, 2]


# ------------------------------------------------------------------------- 2 ranks vs 1, DCP at 1/2/3
COMMON = TINY + [
    f"train.max_iterations={K}",
    f"train.checkpoint_every={K}",
    "train.export_teacher=true",
    "eval.final_knn=false",
    "data.masks.mask_probability=0",  # masks are seeded per rank batch: not comparable across world sizes
    "loss.koleo_weight=0",  # KoLeo is computed within each rank's batch (as in DINOv2)
    "model.drop_path_rate=0",
    "distributed.param_dtype=fp32",
    "optim.warmup_epochs=0.125",  # a non-zero lr from the second step on
    "data.batch_size_per_gpu=4",  # per rank; the one-process reference uses 8
    "optim.base_lr=0.05",  # large steps, so that the parameters move well beyond the tolerance
]


def _torchrun(nproc: int, args: list[str], timeout: float = 400) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=TESTS.parent)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _train_cli() -> list[str]:
    """``dinov2-train`` itself when its console script sits beside this Python, else its module."""
    script = Path(sys.executable).parent / "dinov2-train"
    return ["--no-python", str(script)] if script.is_file() else ["-m", "dinov2.launch.train_cli"]


def _load(cfg, ckpt: Path, fsdp: bool = False) -> dict[str, dict]:
    """Gathered model and optimizer state of ``ckpt`` loaded at world size 1 (plain or FSDP)."""
    sys.path.insert(0, str(TESTS))
    from dist_worker import build, gathered_state

    if not fsdp:
        model, optimizer = build(cfg, DistEnv())
        CheckpointManager(ckpt.parent).load(ckpt, model, optimizer)
        return gathered_state(model, optimizer)
    fsdp_cfg = load_config("train/demo", COMMON + ["distributed.fsdp=true"])
    with distributed_session("gloo", always=True) as env:
        model, optimizer = build(fsdp_cfg, env)
        CheckpointManager(ckpt.parent).load(ckpt, model, optimizer)
        return gathered_state(model, optimizer)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((x.double() - b[k].double()).abs().max().item() for k, x in a.items() if x.numel())


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for name in sa:
        for field, value in sa[name].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[name][field])), (name, field)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-rank torchrun run (batch 4 per rank) and a 1-process run (batch 8), K steps each."""
    root = tmp_path_factory.mktemp("dist")
    two, one = root / "two_ranks", root / "one_process"
    _torchrun(2, [*_train_cli(), "--config", "train/demo", *COMMON, f"train.output_dir={two}"])
    train(load_config("train/demo", COMMON + ["data.batch_size_per_gpu=8", f"train.output_dir={one}"]))
    return {"root": root, "two": two, "one": one, "cfg": load_config("train/demo", COMMON)}


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / f"ckpt_{K:08d}"


@pytest.mark.slow  # several processes or a whole benchmark: the full suite, not the < 3 min fast loop
def test_two_ranks_equal_one_process_with_double_batch(runs):
    cfg = runs["cfg"]
    two = _load(cfg, _ckpt(runs["two"]))["model"]
    one = _load(cfg, _ckpt(runs["one"]))["model"]
    diff = _max_diff(two, one)
    print(f"max |param(2 x 4) - param(1 x 8)| after {K} steps: {diff:.3g}")
    assert diff <= EQUIV_ATOL
    # the parameters moved, so the comparison is not vacuous
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    init = build_meta_arch(cfg, torch.device("cpu")).state_dict()
    moved = max((one[k] - init[k]).abs().max().item() for k in one if k.startswith("student."))
    print(f"max |param change| over the {K} steps: {moved:.3g}")
    assert moved > 100 * EQUIV_ATOL


@pytest.mark.slow  # several processes or a whole benchmark: the full suite, not the < 3 min fast loop
def test_logged_losses_are_the_mean_over_ranks(runs):
    """metrics.jsonl of the 2-rank run holds the losses averaged over both ranks: with equal shards
    that is the loss of the whole batch, i.e. what the 1-process run logs (rank 0's alone is not)."""
    from dinov2.train.metrics import read_metrics

    two, one = (read_metrics(runs[name] / "metrics.jsonl") for name in ("two", "one"))
    assert [r["iteration"] for r in two] == [r["iteration"] for r in one] == list(range(K))
    for a, b in zip(two, one, strict=True):
        assert abs(a["dino"] - b["dino"]) <= 1e-5 and abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)


@pytest.mark.slow  # several processes or a whole benchmark: the full suite, not the < 3 min fast loop
def test_dcp_saved_by_two_ranks_loads_at_world_size_one(runs):
    from safetensors.torch import load_file

    cfg = runs["cfg"]
    plain = _load(cfg, _ckpt(runs["two"]))
    # the teacher the 2-rank run exported itself (gathered in the run, not through DCP)
    exported = load_file(str(runs["two"] / "teacher_backbone.safetensors"))
    for key, value in exported.items():
        assert torch.equal(plain["model"][f"teacher.backbone.{key}"], value), key
    sharded = _load(cfg, _ckpt(runs["two"]), fsdp=True)
    _assert_same_state(plain, sharded)


@pytest.mark.slow  # several processes or a whole benchmark: the full suite, not the < 3 min fast loop
def test_dcp_saved_by_two_ranks_resumes_at_world_size_three(runs):
    cfg = runs["cfg"]
    resume_dir = runs["root"] / "resumed_at_3"
    shutil.copytree(runs["two"], resume_dir)
    dump = runs["root"] / "state_at_3.pt"
    _torchrun(
        3,
        [str(TESTS / "dist_worker.py"), str(_ckpt(runs["two"])), str(dump), str(resume_dir), str(K + 1), *COMMON],
    )
    at_three = torch.load(dump, weights_only=True)
    _assert_same_state(_load(cfg, _ckpt(runs["two"])), at_three)
    resumed = CheckpointManager(resume_dir / "checkpoints")
    latest = resumed.latest()
    assert latest is not None and latest.name == f"ckpt_{K + 1:08d}"
    state = resumed.load(latest, build_meta_arch(cfg, torch.device("cpu")), None)
    assert (state.iteration, state.world_size) == (K + 1, 3)
    for ckpt, ranks in ((_ckpt(runs["two"]), 2), (latest, 3)):  # each rank's generators under its own key
        assert {k for k in saved_keys(ckpt) if k.startswith("rng.")} == {f"rng.rank{r}.cpu" for r in range(ranks)}


# ---------------------------------------------------------------------------------- stop and resume
def test_stop_request_checkpoints_and_the_next_run_resumes_exactly(tmp_path):
    """Stopped after iteration 1 — while the prototype layer is still frozen, so it has no AdamW
    state yet — then resumed: bit-identical to an uninterrupted run."""
    common = TINY + ["train.max_iterations=4", "train.checkpoint_every=100", "train.export_teacher=false"]
    common += ["eval.final_knn=false", "model.drop_path_rate=0.2", "data.batch_size_per_gpu=4"]
    cfg = load_config("train/demo", common + [f"train.output_dir={tmp_path / 'stopped'}"])
    stop = StopRequest()
    stop.request("test")
    first = train(cfg, stop)
    assert first.interrupted and first.iterations == 1
    assert CheckpointManager(tmp_path / "stopped" / "checkpoints").latest().name == "ckpt_00000001"
    second = train(cfg)
    assert not second.interrupted and second.iterations == 4
    train(load_config("train/demo", common + [f"train.output_dir={tmp_path / 'straight'}"]))
    states = [checkpoint_state(cfg, tmp_path / run / "checkpoints") for run in ("stopped", "straight")]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_nccl_fsdp_at_world_size_one_trains_and_resumes(tmp_path):
    """The CPU code path on one GPU: NCCL group of one, FSDP2 with bf16 parameters, bf16 autocast."""
    common = TINY + [
        "distributed.fsdp=true",
        "distributed.backend=nccl",
        "distributed.param_dtype=bf16",
        "train.device=cuda",
        "train.checkpoint_every=2",
        "train.export_teacher=true",
        "eval.final_knn=false",
        f"train.output_dir={tmp_path}",
    ]
    first = train(load_config("train/demo", common + ["train.max_iterations=4"]))
    assert first.iterations == 4 and torch.isfinite(torch.tensor(first.last_losses["loss"]))
    assert not dist.is_initialized()
    second = train(load_config("train/demo", common + ["train.max_iterations=6"]))
    assert second.iterations == 6 and torch.isfinite(torch.tensor(second.last_losses["loss"]))
    assert (tmp_path / "checkpoints" / "ckpt_00000006").is_dir()
