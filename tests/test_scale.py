"""Scaling out: keyed initialisation on the meta device, the HSDP mesh, the memory plan.

Fast tests run in this process (keyed rows invariant to how a parameter is cut, keyed vs eager
distributions, world size 1 with FSDP ≡ unsharded, mesh shapes, ``--plan``). The multi-process tests
share one module fixture of three real runs (gloo, CPU, fp32 parameters, no iBOT masks / KoLeo /
stochastic depth, which are per rank batch by design), global batch 8, 3 AdamW steps:

* ``four``: 4 processes as a 2×2 HSDP mesh (replicate 2 × shard 2), 2 images each;
* ``two``: 2 processes on a 1-D mesh, 4 images each, resuming ``four``'s step-2 checkpoint, with the
  non-default resharding (none after forward) and prefetch (2 blocks ahead in forward, none explicit
  in backward);
* ``one``: 1 process, 8 images, no sharding.

Each multi-process run also dumps its gathered step-0 state and, per rank, its local tensor sizes and
the bytes of its real parameter / gradient / AdamW shards next to ``dinov2.distributed.plan``'s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_state
from tiny_config import SEPARATE_IBOT_HEAD, TINY

from dinov2.config import ConfigError, MeshConfig, load_config
from dinov2.distributed.env import distributed_session
from dinov2.distributed.mesh import local_numel, mesh_shape
from dinov2.distributed.plan import state_bytes
from dinov2.launch.run import build_meta_arch, build_training, construct_meta_arch, plan_shapes, train
from dinov2.layers import init as init_module
from dinov2.layers.init import EAGER, KeyedInit, keyed_rows

TESTS = Path(__file__).resolve().parent
STEPS = 3
ATOL = 1e-5  # max |param| difference after STEPS fp32 steps (the sums are only reordered)


# ------------------------------------------------------------------------------------- keyed init
@pytest.mark.parametrize("shape", [(), (5,), (10, 7), (3, 50, 10), (200,), (130, 3)])
def test_keyed_rows_do_not_depend_on_how_the_parameter_is_cut(shape, monkeypatch):
    monkeypatch.setattr(init_module, "GROUP_NUMEL", 64)  # small row groups: the cuts fall inside and across them

    def sample(t, g):
        torch.nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04, generator=g)

    rows = shape[0] if shape else 1
    whole = keyed_rows(7, "net/w", shape, 0, rows, sample)
    assert whole.shape == (shape if shape else (1,))
    for shards in (2, 3, 4, 5):
        chunk = -(-rows // shards)
        parts = [
            keyed_rows(7, "net/w", shape, min(i * chunk, rows), min((i + 1) * chunk, rows), sample)
            for i in range(shards)
        ]
        assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(keyed_rows(8, "net/w", shape, 0, rows, sample), whole)  # the seed matters
    if rows > 1:
        assert not torch.equal(keyed_rows(7, "net/v", shape, 0, rows, sample), whole)  # and the name


def test_keyed_init_follows_the_eager_distributions():
    """Same constants exactly, and the same spread (std within 10 %) for every random parameter."""
    cfg = load_config("train/demo", TINY)
    model = build_meta_arch(cfg, torch.device("cpu"))  # keyed
    from dinov2.train.meta_arch import SSLMetaArch

    torch.manual_seed(0)
    plain = SSLMetaArch(cfg)  # eager: the modules' reset_parameters() at construction
    keyed = dict(model.student.named_parameters())
    checked = 0
    for name, p in plain.student.named_parameters():
        k = keyed[name]
        if p.numel() > 1 and p.std() == 0:
            assert torch.equal(k, p), name  # constants (LayerNorm, LayerScale, biases, mask token)
            continue
        if p.numel() >= 256:
            assert abs(k.std().item() / p.std().item() - 1) < 0.1, name
            checked += 1
    assert checked >= 8
    assert torch.equal(model.teacher.backbone.pos_embed, model.student.backbone.pos_embed)  # teacher = student


def test_every_parameter_is_initialised_exactly_once():
    cfg = load_config("train/demo", TINY + SEPARATE_IBOT_HEAD + ["model.num_register_tokens=2"])
    model = build_meta_arch(cfg, torch.device("cpu"))
    init = KeyedInit.for_module(0, model.student, "student")
    from dinov2.distributed.meta_init import init_network

    init_network(model.student, init)
    assert sorted(init.filled) == sorted(init.names.values())
    EAGER.zeros_(model.student.backbone.mask_token)  # the eager filler writes in place
    assert not model.student.backbone.mask_token.any()


def test_fsdp_at_world_size_one_starts_from_the_unsharded_weights():
    cfg = load_config("train/demo", TINY + ["distributed.param_dtype=fp32"])
    plain = build_meta_arch(cfg, torch.device("cpu")).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    fsdp = load_config("train/demo", TINY + ["distributed.param_dtype=fp32", "distributed.fsdp=true"])
    with distributed_session("gloo", always=True) as env:
        training = build_training(fsdp, env, torch.device("cpu"))
        assert all(hasattr(p, "to_local") for p in training.model.parameters())
        full = get_model_state_dict(training.model, options=StateDictOptions(full_state_dict=True))
    assert full.keys() == plain.keys()
    for key, value in plain.items():
        assert torch.equal(full[key], value), key
    other = build_meta_arch(load_config("train/demo", TINY + ["train.seed=1"]), torch.device("cpu")).state_dict()
    assert not torch.equal(other["student.backbone.pos_embed"], plain["student.backbone.pos_embed"])


# -------------------------------------------------------------------------------------------- mesh
def test_mesh_shape_defaults_and_errors():
    assert mesh_shape(MeshConfig(), 64, 8) == (8, 8)  # several nodes: shard in a node, replicate across
    assert mesh_shape(MeshConfig(), 8, 8) == (1, 8)  # one node: full sharding
    assert mesh_shape(MeshConfig(), 4, 4) == (1, 4)
    assert mesh_shape(MeshConfig(), 1, 1) == (1, 1)
    assert mesh_shape(MeshConfig(replicate=2), 8, 8) == (2, 4)
    assert mesh_shape(MeshConfig(shard=16), 64, 8) == (4, 16)
    assert mesh_shape(MeshConfig(replicate=2, shard=2), 4, 4) == (2, 2)
    with pytest.raises(ConfigError, match="does not tile"):
        mesh_shape(MeshConfig(replicate=3), 8, 8)
    with pytest.raises(ConfigError, match="does not tile"):
        mesh_shape(MeshConfig(replicate=2, shard=2), 8, 8)
    with pytest.raises(ConfigError, match="positive"):
        mesh_shape(MeshConfig(shard=0), 8, 8)


# -------------------------------------------------------------------------------------------- plan
def test_plan_counts_every_parameter_of_the_real_model():
    cfg = load_config("train/demo", TINY + SEPARATE_IBOT_HEAD)
    nets = {n.name: n for n in plan_shapes(cfg)}
    model = build_meta_arch(cfg, torch.device("cpu"))
    for name, network in model.networks().items():
        assert nets[name].numel() == sum(p.numel() for p in network.parameters())
    # one shard holds everything; S shards partition every parameter's elements exactly
    student = nets["student"]
    for shards in (1, 2, 3, 5):
        assert sum(student.local(shards, i) for i in range(shards)) == student.numel()
    assert local_numel((5, 3), 4, 0) == 6 and local_numel((5, 3), 4, 2) == 3 and local_numel((5, 3), 4, 3) == 0
    state = state_bytes(list(nets.values()), cfg, 1)
    assert state.student_params == 4 * student.numel() and state.optimizer == 8 * student.numel() + 4 * len(
        student.shapes
    )


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_plan_activation_model_against_the_tensors_a_forward_saves(ffn):
    """What a bf16-autocast forward of the student backbone saves for backward (every saved tensor's
    storage, parameters excluded, counted once) against the plan's estimate without the recomputed
    block: within 25 % with all blocks kept and with every second block checkpointed. (CPU kernels;
    the GPU's SDPA saves the same q, k, v, output and log-sum-exp.)"""
    from dinov2.distributed.parallelize import apply_activation_checkpointing
    from dinov2.distributed.plan import activation_bytes

    small = ["model.embed_dim=64", "model.depth=4", "model.num_heads=2", "model.patch_size=4", "model.img_size=32"]
    small += ["data.crops.global_crops_size=32", "data.crops.local_crops_size=16", "data.crops.local_crops_number=2"]
    small += [f"model.ffn_layer={ffn}", "model.drop_path_rate=0"]
    cfg = load_config("train/demo", small)
    backbone = build_meta_arch(cfg, torch.device("cpu")).student.backbone.train()
    student = next(n for n in plan_shapes(cfg) if n.name == "student")
    params = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
    batch = 4
    for mode in ("none", "selective"):
        apply_activation_checkpointing(backbone, mode)
        storages: dict[int, int] = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        crops = [torch.randn(2 * batch, 3, 32, 32), torch.randn(2 * batch, 3, 16, 16)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            backbone(crops)
        saved = sum(n for ptr, n in storages.items() if ptr not in params)
        estimate = activation_bytes(cfg, student, batch, mode, recompute=False)
        print(f"{ffn} {mode}: saved {saved} B, plan {estimate} B ({saved / estimate:.2f})")
        assert 0.75 < saved / estimate < 1.25, (mode, saved, estimate)


def test_plan_cli_vitg_at_64_gpus_and_bad_input(capsys):
    from dinov2.launch.train_cli import main

    assert main(["--plan", "--config", "train/vitg14", "--world-size", "64", "--batch-sizes", "8,16"]) == 0
    out = capsys.readouterr().out
    # the preset's real student, counted on the meta device (no storage)
    n = sum(p.numel() for p in construct_meta_arch(load_config("train/vitg14")).networks()["student"].parameters())
    assert "mesh replicate 8 × shard 8" in out and f"student {n / 1e6:.1f} M" in out
    # per GPU: 3 bf16 all-gathers of the 7/8 it does not hold (student forward and backward, teacher
    # forward), one fp32 reduce-scatter of the gradients, the all-reduce of a 1/8 shard over 8 replicas
    pattern = r"all-gather ([\d.]+) \(bf16\), reduce-scatter ([\d.]+) \(fp32\), all-reduce across replicas ([\d.]+)"
    comm = re.search(pattern, out)
    expected = (3 * 7 / 8 * n * 2, 7 / 8 * n * 4, 2 * 7 / 8 * n / 8 * 4)
    for printed, bytes_ in zip(comm.groups(), expected, strict=True):
        assert float(printed) == pytest.approx(bytes_ / 2**30, rel=0.01, abs=0.006)
    assert "<- config" in out and "fits in 80 GiB" in out
    assert main(["--plan", "--config", "train/vitg14", "--world-size", "64", "distributed.mesh.replicate=3"]) == 2
    bad = capsys.readouterr()
    assert bad.out == "" and bad.err.strip().count("\n") == 0
    assert bad.err.startswith("dinov2-train: error: distributed.mesh")
    assert main(["--plan", "--config", "train/vitg14", "--batch-sizes", "8,x"]) == 2
    assert capsys.readouterr().err.startswith("dinov2-train: error: --batch-sizes")


# ----------------------------------------------------------------------- multi-process runs (gloo)
COMMON = TINY + [
    f"train.max_iterations={STEPS}",
    "train.checkpoint_every=1",
    f"train.keep_last_checkpoints={STEPS}",
    "train.export_teacher=false",
    "eval.final_knn=false",
    "data.masks.mask_probability=0",
    "loss.koleo_weight=0",
    "model.drop_path_rate=0",
    "distributed.param_dtype=fp32",
    "optim.warmup_epochs=0.125",
]


def _torchrun(nproc: int, out: Path, resume_from: str, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [str(TESTS / "scale_worker.py"), str(out), str(STEPS), resume_from, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS.parent))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    four = root / "four"
    _torchrun(4, four, "-", COMMON + ["data.batch_size_per_gpu=2", "distributed.mesh.replicate=2"])
    # the 2-process run resumes the 2x2 run's step-2 checkpoint (its later ones removed)
    partial = root / "four_at_2"
    shutil.copytree(four / "run", partial)
    shutil.rmtree(partial / "checkpoints" / f"ckpt_{STEPS:08d}")
    two = root / "two"
    # with the non-default resharding and prefetch choices, which must not change the numbers
    choices = ["distributed.student_reshard_after_forward=false", "distributed.teacher_reshard_after_forward=false"]
    choices += ["distributed.forward_prefetch=2", "distributed.backward_prefetch=0"]
    _torchrun(2, two, str(partial), COMMON + ["data.batch_size_per_gpu=4", *choices])
    one = root / "one"
    cfg = load_config("train/demo", COMMON + [f"train.output_dir={one / 'run'}"])
    train(cfg)
    torch.save(build_meta_arch(cfg, torch.device("cpu")).state_dict(), root / "one_step0.pt")
    return {"root": root, "four": four, "two": two, "one": one, "cfg": cfg}


def _final(cfg, run: Path) -> dict[str, torch.Tensor]:
    return checkpoint_state(cfg, run / "checkpoints", f"ckpt_{STEPS:08d}")


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _ends_like_one_process(runs, name: str, label: str) -> float:
    """The largest difference between run ``name``'s final parameters and the 1-process run's, printed
    and checked against ATOL."""
    cfg = runs["cfg"]
    diff = _max_diff(_final(cfg, runs[name] / "run"), _final(cfg, runs["one"] / "run"))
    print(f"max |param({label}) - param(1 process)| after {STEPS} steps: {diff:.3g}")
    assert diff <= ATOL
    return diff


@pytest.mark.slow
def test_step0_weights_are_bit_identical_at_1_2_and_4_processes(runs):
    one = torch.load(runs["root"] / "one_step0.pt", weights_only=True)
    for name in ("two", "four"):
        other = torch.load(runs[name] / "step0.pt", weights_only=True)
        assert other.keys() == one.keys()
        for key in one:
            assert torch.equal(other[key], one[key]), (name, key)


@pytest.mark.slow
def test_no_rank_holds_a_full_network_and_the_plan_bytes_are_exact(runs):
    for name, ranks, mesh in (("four", 4, [2, 2]), ("two", 2, [2])):
        for rank in range(ranks):
            record = json.loads((runs[name] / f"rank{rank}.json").read_text())
            assert record["mesh"] == mesh
            for network, (local, full) in record["sizes"].items():
                assert local < full, (name, rank, network)  # sharded: every rank holds a part only
            assert record["actual"] == record["plan"], (name, rank)


@pytest.mark.slow
def test_hsdp_2x2_trains_like_one_process(runs):
    from dinov2.train.metrics import read_metrics

    diff = _ends_like_one_process(runs, "four", "2x2 HSDP")
    four, one = (read_metrics(runs[n] / "run" / "metrics.jsonl") for n in ("four", "one"))
    assert [r["iteration"] for r in four] == [r["iteration"] for r in one] == list(range(STEPS))
    for a, b in zip(four, one, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    init = torch.load(runs["root"] / "one_step0.pt", weights_only=True)
    moved = _max_diff(_final(runs["cfg"], runs["one"] / "run"), init)
    print(f"max |param change| over the {STEPS} steps: {moved:.3g}")
    assert moved > 1e-4 and moved > 100 * diff  # the comparison is not vacuous


@pytest.mark.slow
def test_resume_on_another_mesh(runs):
    """The 2x2 run's step-2 checkpoint, resumed by 2 processes on a 1-D mesh, ends where 1 process does."""
    _ends_like_one_process(runs, "two", "2x2 → 2 resumed")


def test_distillation_teacher_from_a_run_is_loaded_into_shards(tmp_path):
    """A run's teacher is built on meta, sharded and filled by DCP shard by shard: same values as the
    whole-network load (the 2-process case: tests/test_distill.py::test_two_process_fsdp_distillation)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dinov2.distill.teacher_load import load_teacher, load_teacher_sharded
    from dinov2.distributed.mesh import build_mesh

    run = tmp_path / "teacher"
    train(
        load_config("train/demo", TINY + [f"train.output_dir={run}", "train.max_iterations=1", "eval.final_knn=false"])
    )
    distill = TINY + ["distill.enabled=true", f"distill.teacher_checkpoint={run}", "distributed.fsdp=true"]
    cfg = load_config("train/demo", distill + [f"train.output_dir={tmp_path / 'student'}"])
    whole = load_teacher(cfg).state_dict()
    with distributed_session("gloo", always=True) as env:
        mesh = build_mesh(cfg.distributed.mesh, env, torch.device("cpu"))
        teacher = load_teacher_sharded(cfg, mesh, torch.device("cpu"))
        assert all(hasattr(p, "to_local") and not p.requires_grad for p in teacher.parameters())
        sharded = get_model_state_dict(teacher, options=StateDictOptions(full_state_dict=True))
        training = build_training(cfg, env, torch.device("cpu"))
        in_model = get_model_state_dict(training.model.teacher, options=StateDictOptions(full_state_dict=True))
    assert sharded.keys() == whole.keys() == in_model.keys()
    for key, value in whole.items():
        assert torch.equal(sharded[key], value) and torch.equal(in_model[key], value), key
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # a file, not a run: the caller loads it whole
    other = load_config("train/demo", TINY + ["distill.enabled=true", f"distill.teacher_checkpoint={weights}"])
    assert load_teacher_sharded(other, None, torch.device("cpu")) is None
