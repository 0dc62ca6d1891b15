"""torch.compile (inductor) + activation checkpointing + FSDP2 (gloo) on CPU, attention backends, precision.

What the CPU can prove about the step we train, so that a GPU's minutes go to what only it can tell:

* the trainer's step compiled with activation checkpointing none / selective / full, plain and under
  FSDP2 (world size 1 in-process, 2 processes under torchrun): dynamo reports no graph break, every
  block's forward runs as a compiled region (``Torch-Compiled Region`` profiler ranges = blocks run, and
  no block body runs as Python at run time — main's checkpointed blocks did, inside compiled frames),
  nothing recompiles after the warm-up step although masks and stochastic-depth subsets change, and the
  compiled first-step loss is the eager one — read from ``benchmarks/gpu_check.py --dry-run`` (module
  fixture, one compiled run shared by every assertion), which is also the CI version of ``make gpu-check``;
* blocks are compiled with ``fullgraph=True``: a new graph break is an error, not a silent eager block;
* a depth-12 student with non-uniform drop path and two more distilled students stay compiled (dynamo's
  recompile limit, shared by all compiled blocks, is budgeted per kind of block);
* attention backends resolve under ``no_grad``; flex builds one block mask per forward and layout, in
  memory linear in the tokens;
* the residual stream has one dtype in training and evaluation; efficient stochastic depth rescales in
  fp32; teacher logits are fp32 before the temperature; ``train.amp=fp16`` is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO
from tiny_config import TINY

from dinov2.config import load_config

AC_MODES = ("none", "selective", "full")


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    """One ``gpu_check --dry-run`` (every section, in-process): the compiled runs the tests below read."""
    sys.path.insert(0, str(REPO))
    from benchmarks import gpu_check as module

    out = tmp_path_factory.mktemp("gpu_check")
    code = module.main(["--dry-run", "--out", str(out), "--markdown", str(out / "BENCH.md")])
    return {"code": code, "out": out, "record": json.loads((out / "results.json").read_text())}


@pytest.mark.slow  # (with the tests below, one compiled dry run: ~1 min on 2 cores with inductor's cache warm)
def test_gpu_check_dry_run_passes_and_writes_one_folder(gpu_check):
    sections = gpu_check["record"]["sections"]
    assert gpu_check["code"] == 0, {name: s.get("problems") for name, s in sections.items()}
    assert list(sections) == ["pytest", "compiled_step", "fsdp_step", "attention", "throughput", "cifar10_knn"]
    assert sections["pytest"]["status"] == "skipped"  # no CUDA: the GPU tests would all skip
    assert all(s["status"] == "passed" for name, s in sections.items() if name != "pytest"), sections
    summary = (gpu_check["out"] / "summary.md").read_text()
    assert "compiled regions/step" in summary and "| selective |" in summary
    assert "<!-- gpu-check-dry:begin -->" in (gpu_check["out"] / "BENCH.md").read_text()
    assert (gpu_check["out"] / "throughput.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("section", ["compiled_step", "fsdp_step"])
@pytest.mark.parametrize("ac", AC_MODES)
def test_every_block_runs_compiled_without_breaks_or_recompiles(gpu_check, section, ac):
    run = gpu_check["record"]["sections"][section]["modes"][ac]
    assert run["graph_breaks"] == 0, run["graph_break_reasons"]
    # teacher (2 blocks) + student (2 blocks): each block forward is one compiled region, on every step
    assert run["blocks_per_step"] == 4
    assert run["compiled_regions_per_step"] == [4, 4, 4]
    assert run["eager_block_calls_per_step"] == [0, 0, 0]  # nor does any block body run as Python
    # new masks and new stochastic-depth subsets every step, and nothing recompiles after the first
    assert run["recompiles_after_warmup"] == 0
    assert len(set(run["losses"])) == len(run["losses"])
    # the compiled step computes what the eager step computes (same seed, same stochastic-depth draws)
    assert run["losses"][0] == pytest.approx(run["eager_first_loss"], rel=1e-5)
    assert run["teacher_ema_max_change"] > 0 and all(g > 0 for g in run["grad_norms"])


@pytest.mark.slow
def test_two_process_fsdp_steps_compile_every_block(tmp_path):
    """The same checks with 2 ranks of FSDP2 over gloo (``gpu_check --section fsdp_step`` under torchrun)."""
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(REPO / "benchmarks" / "gpu_check.py"), "--section", "fsdp_step", "--dry-run", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    for rank_file in ("fsdp_step.json", "fsdp_step.rank1.json"):
        result = json.loads((tmp_path / rank_file).read_text())
        assert result["world_size"] == 2
        for ac in AC_MODES:
            run = result["modes"][ac]
            assert run.get("problems") == [], (rank_file, ac, run.get("problems"), proc.stderr[-3000:])
            assert run["graph_breaks"] == 0 and run["recompiles_after_warmup"] == 0
            assert run["compiled_regions_per_step"] == [run["blocks_per_step"]] * 3
            assert run["eager_block_calls_per_step"] == [0, 0, 0]
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tiny_step_config(overrides=()):
    return load_config("train/demo", TINY + ["distributed.compile=true", "distributed.param_dtype=fp32", *overrides])


def test_a_graph_break_in_a_block_is_an_error(monkeypatch):
    """Blocks compile with ``fullgraph=True``: a break fails loudly instead of leaving the block eager."""
    from dinov2.distributed.env import DistEnv
    from dinov2.distributed.parallelize import parallelize
    from dinov2.launch.run import build_meta_arch
    from dinov2.layers.block import Block

    def ffn_branch_with_a_break(self, x, seqs):
        torch._dynamo.graph_break()
        return self.ls2(self.mlp(self.norm2(x)))

    monkeypatch.setattr(Block, "ffn_branch", ffn_branch_with_a_break)
    cfg = _tiny_step_config()
    model = build_meta_arch(cfg, torch.device("cpu"))
    parallelize(model, cfg.distributed, DistEnv())
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        model.teacher.backbone(x)


@pytest.mark.slow
def test_non_uniform_drop_path_and_three_students_stay_compiled(tmp_path):
    """A depth-12 student with linearly increasing drop path (12 kinds of block) and two more students of
    other widths, distilled from one teacher: more kinds of compiled block than dynamo's default
    recompile limit (8 graphs per code object, shared by all blocks) — every block still runs compiled."""
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_check import check_step, eager_block_calls
    from dinov2.distributed.env import DistEnv
    from dinov2.eval.backbone_io import save_backbone
    from dinov2.models import build_backbone

    teacher_cfg = load_config("train/demo", TINY)
    torch.manual_seed(0)
    save_backbone(build_backbone(teacher_cfg.model), teacher_cfg, tmp_path / "teacher", "teacher_backbone.safetensors")
    extra = "patch_size: 4, img_size: 16, depth: 1, arch: vit_small, layerscale_init: 0.1"
    cfg = _tiny_step_config(
        [
            "distill.enabled=true",
            f"distill.teacher_checkpoint={tmp_path / 'teacher' / 'teacher_backbone.safetensors'}",
            *[f"distill.teacher_model.{k}" for k in ("embed_dim=32", "depth=2", "num_heads=2", "patch_size=4")],
            "distill.teacher_model.img_size=16",
            "distill.teacher_model.layerscale_init=0.1",
            "model.depth=12",
            "model.drop_path_rate=0.3",
            "model.drop_path_uniform=false",
            "data.batch_size_per_gpu=2",
            f"distill.extra_students=[{{name: b, model: {{embed_dim: 16, num_heads: 2, {extra}}}}}, "
            f"{{name: l, model: {{embed_dim: 24, num_heads: 2, {extra}}}}}]",
        ]
    )
    with eager_block_calls() as calls:
        run = check_step(cfg, DistEnv(), torch.device("cpu"), 2, None, calls)
    assert run["blocks_per_step"] == 2 + 12 + 1 + 1
    assert run["graph_breaks"] == 0
    assert run["eager_block_calls_per_step"] == [0, 0], run
    assert run["compiled_regions_per_step"] == [16, 16], run
    assert run["recompiles_after_warmup"] == 0 and run["problems"] == []
    assert torch._dynamo.config.recompile_limit >= 15  # one budget per kind of block, not one for all


# ------------------------------------------------------------------------------------------ attention
def test_backends_resolve_under_no_grad_and_inference_mode():
    """The probe enables gradients itself: under ``no_grad`` flex is selected on CPU for what it can run
    there (forward), and sdpa is kept where gradients are needed (no flex backward on CPU)."""
    from dinov2.layers.attention import AttentionDispatcher, FlexAttention

    for context in (torch.no_grad, torch.inference_mode):
        dispatcher = AttentionDispatcher("flex", compile_flex=False)
        with context():
            name, backend = dispatcher.resolve(torch.device("cpu"))
        assert name == "flex" and isinstance(backend, FlexAttention)
        from dinov2.layers.attention import SDPA

        resolved = dispatcher._resolved["cpu"]
        assert resolved.pick(torch.float32, needs_grad=False) is backend
        assert resolved.pick(torch.float32, needs_grad=True) is SDPA


def _tiny_vit(backend, drop_path=0.3):
    from dinov2.models import create_vit

    torch.manual_seed(0)
    return create_vit(
        "vit_small", embed_dim=32, depth=3, num_heads=2, patch_size=4, img_size=16, layerscale_init=0.5,
        drop_path_rate=drop_path, attn_backend=backend,
    )  # fmt: skip


def test_flex_builds_one_block_mask_per_forward_and_matches_math(monkeypatch):
    from torch.nn.attention.flex_attention import BlockMask

    flex, reference = _tiny_vit("flex"), _tiny_vit("math")
    crops = [torch.randn(4, 3, 16, 16), torch.randn(8, 3, 8, 8)]
    with torch.no_grad():
        flex(crops)  # resolves the backend: the probe builds masks of its own
    built = []
    original = BlockMask.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(BlockMask, "__init__", counting_init)
    for training in (False, True):  # eval: the full layout; train: the stochastic-depth subset layout
        flex.train(training)
        reference.train(training)
        built.clear()
        with torch.no_grad():
            torch.manual_seed(1)
            out = flex(crops)
            torch.manual_seed(1)  # the same stochastic-depth subsets
            ref = reference(crops)
        assert len(built) == 1, f"{len(built)} block masks for one forward of 3 blocks"
        for got, want in zip(out, ref, strict=True):
            torch.testing.assert_close(got["patch"], want["patch"], rtol=1e-5, atol=1e-5)


def test_document_block_mask_equals_torch_mask_and_is_linear_in_memory():
    """Same tiles as ``create_block_mask`` over the dense document mask (small T); at a ViT-S batch-128
    student's T = 116,992 it is built in well under 256 MiB (a T×T mask there is 12.7 GiB)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from dinov2.layers.attention import document_block_mask, document_ids

    seqs = [(3, 100), (5, 37), (2, 1)]
    ours = document_block_mask(seqs, torch.device("cpu"))
    total = sum(b * n for b, n in seqs)
    doc = document_ids(seqs, torch.device("cpu"))
    theirs = create_block_mask(lambda b, h, q, k: doc[q] == doc[k], None, None, total, total, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)

    script = textwrap.dedent(
        """
        import resource, torch
        from dinov2.layers.attention import document_block_mask
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mask = document_block_mask([(256, 257), (1024, 50)], torch.device("cpu"))
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(mask.seq_lengths[0], grew // 1024)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens, grew_mib = map(int, proc.stdout.split())
    assert tokens == 116_992 and grew_mib < 256, grew_mib


# ------------------------------------------------------------------------------------------ precision
def test_residual_stream_has_one_dtype_in_training_and_evaluation():
    """Under bf16 autocast the residual stream is fp32 after every block, with efficient stochastic depth
    (training) as without (evaluation; the teacher)."""
    model = _tiny_vit("sdpa")
    seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: seen[mod.training].add(out.dtype))
    crops = [torch.randn(4, 3, 16, 16), torch.randn(8, 3, 8, 8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for training in (True, False):
            model.train(training)
            model(crops)
    assert seen == {True: {torch.float32}, False: {torch.float32}}


def test_efficient_stochastic_depth_rescales_in_fp32():
    """A bf16 residual stream with an fp32 branch (LayerScale under autocast) gives an fp32 result, and
    the b/keep factor is exact: 10/6, not bf16's 1.6640625."""
    from dinov2.layers.stochastic_depth import residual

    seqs = [(10, 3)]
    x = torch.randn(30, 4).to(torch.bfloat16)
    out = residual(x, seqs, lambda t, s: torch.ones(t.shape, dtype=torch.float32), 0.4, "efficient", training=True)
    assert out.dtype == torch.float32
    update = (out - x.float()).abs().sum(-1) > 0
    assert update.sum() == 18  # 6 of 10 samples × 3 tokens
    torch.testing.assert_close((out - x.float())[update], torch.full((18, 4), 10 / 6), rtol=1e-7, atol=0)


def test_teacher_logits_are_fp32_before_the_temperature():
    from dinov2.data import build_train_loader
    from dinov2.train.meta_arch import SSLMetaArch

    cfg = load_config("train/demo", TINY)
    model = SSLMetaArch(cfg)
    dtypes = []
    model.teacher.dino_head.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    batch = next(iter(build_train_loader(cfg.data, cfg.model.patch_size)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.teacher_targets(batch["global_crops"], batch["mask_indices"], 0.04)
    assert dtypes == [torch.float32]


def test_fp16_autocast_is_refused_with_one_line(tmp_path, capsys):
    from dinov2.launch.train_cli import main

    out = tmp_path / "run"
    code = main(["--config", "train/demo", "train.amp=fp16", f"train.output_dir={out}", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dinov2-train: error:") and "train.amp" in err[0]
    assert not out.exists()
