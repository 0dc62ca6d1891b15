"""One command for a lent GPU: what only a GPU can tell, in priority order, into one folder.

    make gpu-check          # on the GPU machine, = python3 benchmarks/gpu_check.py (≤ 8 minutes on an H100/H200)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check          # CPU: tiny model, same code paths
    python benchmarks/gpu_check.py --report DIR --markdown docs/BENCHMARKS.md  # a fetched run into the docs

Sections, in priority order; each runs in its own process under a time limit (in-process with
``--dry-run``), so a failure, a crash or a hang in one does not stop the next:

1. ``pytest``: ``pytest -m gpu`` (the GPU-marked tests of the suite);
2. ``compiled_step``: the trainer's ViT-S/14 step (``build_training`` + ``train_step``), bf16 autocast,
   compiled, for activation checkpointing none, full and selective: dynamo graph breaks, compiled
   regions per step against the blocks run (every block's forward must be one), recompilations after
   the warm-up step across batches with different masks and stochastic-depth subsets, host syncs of
   one step under ``torch.cuda.set_sync_debug_mode("warn")``, the compiled first-step loss against an
   eager build at the same seed, images/s;
3. ``fsdp_step``: the same under FSDP2 at world size 1 (NCCL, bf16 parameters), plus finite loss and
   grad norm and that the EMA moves the teacher; under ``torchrun`` it runs at any world size;
4. ``attention``: backend resolution under ``no_grad`` (sdpa, flex, varlen), then forward + backward
   time and peak memory of each at T ≈ 29k tokens (ViT-L heads, 2×32×257 + 8×32×50), the per-forward
   metadata (block mask, cu_seqlens) timed apart and built under the sync debug mode;
5. ``throughput``: ``benchmarks/throughput.py --models s,l``, short;
6. ``cifar10_knn``: ``benchmarks/cifar10_knn.py`` for one minute of training.

Everything lands in ``--out`` (default ``$OUT/gpu_check`` when ``$OUT`` is set — the device tool's
folder —, else ``outputs/gpu_check``): ``results.json``, ``summary.md`` (what ``--report … --markdown``
puts into docs/BENCHMARKS.md), one ``<section>.log`` each. The exit status is 1 when a section failed.

The GPU machine has no package index and lacks omegaconf/submitit/fvcore: when ``import omegaconf``
fails, the wheels in ``--wheels`` (default: ``.carry/wheels``, else ``../shared/wheels/py312``) are
installed into ``/tmp/dinov2-site`` and put on ``PYTHONPATH`` for every section (ENVIRONMENT.md). Copy
them and the CIFAR-10 blobs next to the code first with ``make gpu-carry`` and carry ``.carry``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(REPO))

from benchmarks.tables import format_table, header_lines, update_markdown  # noqa: E402 — stdlib only

# Everything else this module needs (torch, dinov2, the other benchmarks) is imported inside the sections:
# they run after ensure_packages has installed the carried omegaconf wheel, and `--help` stays instant.

SECTIONS = ("pytest", "compiled_step", "fsdp_step", "attention", "throughput", "cifar10_knn")
# seconds each section may take on the GPU (the total is capped by --budget-s as well)
BUDGETS = {"pytest": 110, "compiled_step": 150, "fsdp_step": 90, "attention": 90, "throughput": 120, "cifar10_knn": 95}
TOTAL_BUDGET_S = 475  # under 8 minutes, with room for start-up inside a 10-minute device call
SITE = Path("/tmp/dinov2-site")
AC_MODES = ("none", "full", "selective")  # priority order; dinov2.config.ActivationCheckpointing (not imported:
# this module runs before the carried omegaconf wheel is installed)
ATTENTION_SEQS = ((64, 257), (256, 50))  # ViT-L/14 at batch 32: 2×32 globals of 257 tokens, 8×32 locals of 50
ATTENTION_HEADS, ATTENTION_HEAD_DIM = 16, 64
DRY_ATTENTION_SEQS = ((8, 17), (32, 5))
GPU_BATCH = 128  # ViT-S/14 batch of the step checks (throughput.py's default for S, so its graphs are reused)
DRY_BATCH = 4


# ------------------------------------------------------------------------------------ environment
def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check" if os.environ.get("OUT") else REPO / "outputs" / "gpu_check"


def ensure_packages(wheels: Path | None) -> dict[str, str]:
    """The environment for the sections: the repository on ``PYTHONPATH``, and the carried wheels
    installed into ``SITE`` when the project's pure-Python dependencies are missing (GPU machine)."""
    env = dict(os.environ)
    paths = [str(REPO)]
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        candidates = [wheels] if wheels else [REPO / ".carry" / "wheels", REPO.parent / "shared" / "wheels" / "py312"]
        found = next((c for c in candidates if c is not None and any(c.glob("*.whl"))), None)
        if found is None:
            raise SystemExit(
                "gpu_check: error: omegaconf is not installed and no wheels were found "
                f"(looked in {', '.join(str(c) for c in candidates)}); run `make gpu-carry` and carry .carry"
            ) from None
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(SITE)]
        subprocess.run(cmd + [str(w) for w in sorted(found.glob("*.whl"))], check=True)
        paths.append(str(SITE))
        sys.path[:0] = [str(SITE)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def find_cifar(data: str | None) -> Path | None:
    from benchmarks.cifar10_knn import DEFAULT_DATA

    for candidate in ([Path(data)] if data else []) + [REPO / ".carry" / "cifar10", DEFAULT_DATA]:
        if (candidate / "README.md").exists() or any(candidate.glob("*")):
            return candidate
    return None


# ------------------------------------------------------------------------------------ measurements
def dynamo_counts() -> dict[str, int]:
    """Graph breaks and compiled graphs so far in this process (``torch._dynamo.utils.counters``)."""
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}


def graph_break_reasons() -> list[str]:
    from torch._dynamo.utils import counters

    return [reason.splitlines()[0] for reason in counters["graph_break"]]


def compiled_regions(fn) -> tuple[Any, int]:
    """``fn()`` under the profiler, and how many compiled regions (dynamo frames) ran in it: every
    execution of a compiled graph is one ``Torch-Compiled Region`` range."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(1 for e in prof.events() if e.name.startswith("Torch-Compiled Region"))


@contextlib.contextmanager
def eager_block_calls():
    """A list that grows by one whenever a block's forward body runs as Python at run time — eagerly,
    because it was never compiled or fell out of its compiled region (e.g. a checkpoint that dynamo could
    not trace runs eagerly inside an otherwise compiled frame, which profiler ranges do not show). The
    wrapper is inlined by dynamo when it traces, so compiled code never calls it."""
    import torch

    from dinov2.layers.block import Block

    calls: list[int] = []
    original = Block.forward

    def counted(self, *args, **kwargs):
        if not torch.compiler.is_compiling():
            calls.append(1)
        return original(self, *args, **kwargs)

    Block.forward = counted
    try:
        yield calls
    finally:
        Block.forward = original


def host_syncs(fn, device) -> tuple[Any, list[str]]:
    """``fn()`` with CUDA's sync debug mode on "warn": the synchronising calls it made (CUDA only)."""
    import torch

    if device.type != "cuda":
        return fn(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]


def step_config(dry: bool, ac: str, compiled: bool, fsdp: bool, batch: int):
    from benchmarks.throughput import TINY
    from dinov2.config import load_config

    overrides = [
        f"data.batch_size_per_gpu={batch}",
        f"distributed.activation_checkpointing={ac}",
        f"distributed.compile={str(compiled).lower()}",
        f"distributed.fsdp={str(fsdp).lower()}",
    ]  # the preset's efficient stochastic depth (0.3; the tiny model's 0.2): a new random subset every step
    if dry:
        overrides += TINY + ["distributed.param_dtype=fp32"]
    return load_config("train/vits14", overrides)


def check_step(cfg, env, device, steps: int, reference_loss: float | None, eager_calls: list | None = None):
    """The trainer's build and step under ``cfg`` (see the module docstring, section 2); ``eager_calls``:
    the list of :func:`eager_block_calls`, installed before the blocks were first compiled."""

    from benchmarks.devices import synchronize
    from benchmarks.throughput import check_optimizer_holds, synthetic_batch
    from dinov2.distributed.meta_init import local_shard
    from dinov2.launch.run import build_training
    from dinov2.train.schedules import ScheduleValues

    batch_size = cfg.data.batch_size_per_gpu
    batches = [synthetic_batch(cfg, batch_size, device, seed + 100 * env.rank) for seed in range(steps + 1)]
    values = ScheduleValues(lr=1e-4, weight_decay=0.04, momentum=0.99, teacher_temp=0.07, freeze_last_layer=False)
    before = dynamo_counts()
    training = build_training(cfg, env, device)
    model = training.model
    check_optimizer_holds(model, training.optimizer)
    model.train()
    blocks = len(model.teacher.backbone.blocks) + sum(len(n.backbone.blocks) for n in model.trained_networks().values())
    ema = model.exported_backbone()  # what the EMA moves: the teacher (the students' EMA when distilling)
    teacher_before = [local_shard(p).detach().clone() for p in ema.parameters()]

    def step(i: int):
        return training.step(batches[i], values)

    tick = time.perf_counter()
    first = step(0)  # the warm-up: compilation happens here
    synchronize(device)
    warmup_s = time.perf_counter() - tick
    after_warmup = dynamo_counts()
    regions, syncs, losses, grad_norms, times = [], [], [float(first["loss"])], [float(first["grad_norm"])], []
    eager = []
    for i in range(1, steps + 1):
        synchronize(device)
        calls_before = len(eager_calls) if eager_calls is not None else 0
        tick = time.perf_counter()
        if i == 1:
            (parts, count), syncs = host_syncs(lambda i=i: compiled_regions(lambda: step(i)), device)
        else:
            parts, count = compiled_regions(lambda i=i: step(i))
        synchronize(device)
        times.append(time.perf_counter() - tick)
        eager.append(len(eager_calls) - calls_before if eager_calls is not None else None)
        regions.append(count)
        losses.append(float(parts["loss"]))
        grad_norms.append(float(parts["grad_norm"]))
    end = dynamo_counts()
    moved = max(  # over this rank's shards (some are empty at world size > 1)
        ((local_shard(p).detach() - b).abs().max().item() for p, b in zip(ema.parameters(), teacher_before, strict=True)
         if b.numel()),
        default=0.0,
    )
    result = {
        "blocks_per_step": blocks,
        "compiled_regions_per_step": regions,
        "eager_block_calls_per_step": eager,
        "graph_breaks": end["graph_breaks"] - before["graph_breaks"],
        "graph_break_reasons": graph_break_reasons(),
        "graphs_compiled_in_warmup": after_warmup["graphs"] - before["graphs"],
        "recompiles_after_warmup": end["graphs"] - after_warmup["graphs"],
        "host_syncs": syncs,
        "losses": losses,
        "grad_norms": grad_norms,
        "teacher_ema_max_change": moved,
        "warmup_s": warmup_s,
        "images_per_s": batch_size / sorted(times)[len(times) // 2],
        "eager_first_loss": reference_loss,
    }
    problems = []
    if cfg.distributed.compile:
        if result["graph_breaks"]:
            problems.append(f"{result['graph_breaks']} graph breaks")
        if any(r < blocks for r in regions):
            problems.append(f"compiled regions per step {regions} < {blocks} blocks run")
        if any(eager):
            problems.append(f"block forwards run eagerly per step: {eager}")
        if result["recompiles_after_warmup"]:
            problems.append(f"{result['recompiles_after_warmup']} recompilations after the warm-up step")
    if syncs:
        problems.append(f"{len(syncs)} host synchronisations in one step")
    if not all(map(_finite, losses + grad_norms)) or not any(g > 0 for g in grad_norms):
        problems.append("non-finite loss or grad norm, or a zero grad norm")
    if not moved > 0:
        problems.append("the EMA did not move the network it averages")
    if reference_loss is not None:
        tolerance = 1e-4 if device.type == "cpu" else 2e-2  # fp32 vs bf16 autocast (different kernels)
        result["compiled_vs_eager_rel"] = abs(losses[0] - reference_loss) / max(abs(reference_loss), 1e-12)
        if result["compiled_vs_eager_rel"] > tolerance:
            problems.append(f"compiled loss {losses[0]:.6f} vs eager {reference_loss:.6f}")
    result["problems"] = problems
    return result


def _finite(value: float) -> bool:
    return math.isfinite(value)


def eager_first_loss(cfg, env, device) -> float:
    """Loss of the first step of the same configuration built without compilation, at the same seed."""
    from benchmarks.throughput import synthetic_batch
    from dinov2.launch.run import build_training
    from dinov2.train.schedules import ScheduleValues

    eager = replace(cfg, distributed=replace(cfg.distributed, compile=False))
    training = build_training(eager, env, device)
    training.model.train()
    batch = synthetic_batch(cfg, cfg.data.batch_size_per_gpu, device, 100 * env.rank)
    values = ScheduleValues(lr=1e-4, weight_decay=0.04, momentum=0.99, teacher_temp=0.07, freeze_last_layer=False)
    return float(training.step(batch, values)["loss"])


def section_step(dry: bool, fsdp: bool) -> dict[str, Any]:
    """Sections 2 and 3: :func:`check_step` for every activation-checkpointing mode."""
    import torch

    from benchmarks.devices import resolve_device
    from dinov2.distributed.env import DistEnv, distributed_session

    device = resolve_device("cpu" if dry else "cuda")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    batch = DRY_BATCH if dry else GPU_BATCH
    out: dict[str, Any] = {"device": str(device), "batch": batch, "modes": {}}
    session = distributed_session("auto", always=True) if fsdp else contextlib.nullcontext(DistEnv())
    with session as env, eager_block_calls() as eager_calls:
        if fsdp:
            out["world_size"] = env.world_size
        for ac in AC_MODES:
            try:
                cfg = step_config(dry, ac, compiled=True, fsdp=fsdp, batch=batch)
                reference = eager_first_loss(cfg, env, device)
                out["modes"][ac] = check_step(cfg, env, device, 3, reference, eager_calls)
            except Exception as e:  # noqa: BLE001 — keep going with the next mode, report this one
                out["modes"][ac] = {"problems": [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]}
                traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out["problems"] = [f"AC {ac}: {p}" for ac, m in out["modes"].items() for p in m.get("problems", [])]
    return out


def section_attention(dry: bool) -> dict[str, Any]:
    """Section 4: resolution under no_grad, then forward + backward time and peak memory per backend."""
    import torch

    from benchmarks.devices import peak_memory_gib, reset_peak_memory, resolve_device, synchronize
    from benchmarks.timing import time_steps
    from dinov2.layers.attention import AttentionDispatcher

    device = resolve_device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    seqs = DRY_ATTENTION_SEQS if dry else ATTENTION_SEQS
    heads, head_dim = (2, 16) if dry else (ATTENTION_HEADS, ATTENTION_HEAD_DIM)
    total = sum(b * n for b, n in seqs)
    out: dict[str, Any] = {"tokens": total, "seqs": seqs, "dtype": str(dtype), "backends": {}}
    problems = []
    for name in ("sdpa", "flex", "varlen"):
        row: dict[str, Any] = {}
        out["backends"][name] = row
        dispatcher = AttentionDispatcher(name)
        with torch.no_grad():
            selected, _ = dispatcher.resolve(device)
        resolved = dispatcher._resolved[device.type]
        row["selected_under_no_grad"] = selected
        row["with_grad"] = sorted(str(d) for d in resolved.with_grad)
        row["without_grad"] = sorted(str(d) for d in resolved.without_grad)
        if not dry and name in ("sdpa", "flex") and selected != name:
            problems.append(f"{name}: not selected on the GPU (fell back to {selected})")
        qkv = torch.randn(total, 3, heads, head_dim, device=device, dtype=dtype)
        for needs_grad in (False, True):
            backend = resolved.pick(dtype, needs_grad)
            label = "fwd+bwd" if needs_grad else "fwd"
            if backend.name != name:
                row[label] = f"unavailable (uses {backend.name})"
                continue
            try:
                tick = time.perf_counter()
                meta, syncs = host_syncs(lambda backend=backend: backend.prepare(seqs, device), device)
                synchronize(device)
                row["prepare_s"] = time.perf_counter() - tick
                row["prepare_host_syncs"] = syncs
                if syncs:
                    problems.append(f"{name}: {len(syncs)} host syncs building its per-forward metadata")
                x = qkv.detach().requires_grad_(needs_grad)
                grad = torch.randn(total, heads * head_dim, device=device, dtype=dtype)

                def run(x=x, meta=meta, backend=backend, needs_grad=needs_grad, grad=grad):
                    with torch.set_grad_enabled(needs_grad):
                        y = backend(x, seqs, meta)
                        if needs_grad:
                            y.backward(grad)

                reset_peak_memory(device)
                times = time_steps(run, steps=5 if dry else 10, warmup=1 if dry else 3, device=device)
                row[label] = {"ms": 1e3 * sorted(times)[len(times) // 2], "peak_gib": peak_memory_gib(device)}
            except Exception as e:  # noqa: BLE001
                row[label] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                problems.append(f"{name} {label}: {row[label]}")
    out["problems"] = problems
    return out


def section_throughput(dry: bool, out_dir: Path) -> dict[str, Any]:
    from benchmarks import throughput

    args = ["--json", str(out_dir / "throughput.json")]
    args += ["--device", "cpu", "--tiny"] if dry else ["--models", "s,l", "--steps", "5", "--warmup", "2", "--no-count"]
    rows = throughput.main(args)
    problems = [f"{r.model}: out of memory" for r in rows if r.images_per_s is None]
    return {"rows": [r.__dict__ for r in rows], "problems": problems}


def section_cifar(dry: bool, out_dir: Path, data: str | None) -> dict[str, Any]:
    from benchmarks import cifar10_knn

    root = find_cifar(data)
    if root is None:
        return {"skipped": "no CIFAR-10 blobs (.carry/cifar10 or ../shared/data/cifar10): run make gpu-carry"}
    args = ["--data", str(root), "--output-dir", str(out_dir / "cifar10"), "--evals", "1"]
    args += ["--device", "cpu", "--tiny", "--budget-min", "0.03"] if dry else ["--budget-min", "1"]
    record = cifar10_knn.main(args)
    losses = record["losses"]
    problems = [] if losses and all(map(_finite, losses)) else ["non-finite or no loss"]
    return {"row": record["row"], "problems": problems}


def section_pytest(dry: bool, out_dir: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    if dry:
        return {"skipped": "--dry-run: the GPU tests skip without CUDA"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs"]
    cmd += ["--continue-on-collection-errors", f"--junitxml={out_dir / 'pytest_gpu.xml'}", "tests"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout - 10, 5))
    except subprocess.TimeoutExpired as e:
        text = [t.decode(errors="replace") if isinstance(t, bytes) else (t or "") for t in (e.stdout, e.stderr)]
        (out_dir / "pytest.log").write_text("".join(text))
        return {"problems": [f"pytest -m gpu did not finish in {timeout - 10:.0f} s (see pytest.log)"]}
    (out_dir / "pytest.log").write_text(proc.stdout + proc.stderr)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"summary": tail[0], "failed": failed, "problems": failed or ([] if proc.returncode == 0 else tail)}


# ------------------------------------------------------------------------------------------- driver
def run_section(name: str, dry: bool, out_dir: Path, data: str | None, env: dict[str, str], timeout: float):
    if name == "pytest":
        return section_pytest(dry, out_dir, env, timeout)
    if name in ("compiled_step", "fsdp_step"):
        return section_step(dry, fsdp=name == "fsdp_step")
    if name == "attention":
        return section_attention(dry)
    if name == "throughput":
        return section_throughput(dry, out_dir)
    if name == "cifar10_knn":
        return section_cifar(dry, out_dir, data)
    raise SystemExit(f"unknown section '{name}' (choose from {', '.join(SECTIONS)})")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def section_main(args: argparse.Namespace) -> int:
    """``--section NAME``: one section in this process; writes ``NAME.json`` (``NAME.rank{r}.json`` off rank 0)."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    try:
        result = run_section(args.section, args.dry_run, out_dir, args.data, dict(os.environ), args.budget_s)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        result = {"problems": [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]}
    result["seconds"] = time.perf_counter() - tick
    result["status"] = "skipped" if "skipped" in result else ("failed" if result.get("problems") else "passed")
    suffix = "" if _rank() == 0 else f".rank{_rank()}"
    (out_dir / f"{args.section}{suffix}.json").write_text(json.dumps(result, indent=1, default=str))
    return 1 if result["status"] == "failed" else 0


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = ensure_packages(Path(args.wheels) if args.wheels else None)
    sections = [s.strip() for s in args.sections.split(",")] if args.sections else list(SECTIONS)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    header = _header(args.dry_run)
    for name in sections:
        left = args.budget_s - (time.perf_counter() - start)
        limit = min(BUDGETS.get(name, 60), left) if not args.dry_run else 3600.0
        if limit < 15 and not args.dry_run:  # the time limits are the GPU's; the CPU dry run takes what it takes
            results[name] = {"status": "skipped", "skipped": f"out of time ({left:.0f} s left of {args.budget_s} s)"}
            continue
        print(f"[gpu_check] {name} (limit {limit:.0f} s)", flush=True)
        if args.dry_run and not args.isolate:  # in-process: the CI version stays cheap (no interpreter per section)
            tick = time.perf_counter()
            try:
                result = run_section(name, True, out_dir, args.data, env, limit)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                result = {"problems": [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]}
            result["seconds"] = time.perf_counter() - tick
            result["status"] = "skipped" if "skipped" in result else ("failed" if result.get("problems") else "passed")
        else:
            result = _subprocess_section(name, out_dir, args, env, limit)
        results[name] = result
        print(f"[gpu_check] {name}: {result['status']} in {result.get('seconds', 0):.0f} s", flush=True)
    record = {"header": header, "dry_run": args.dry_run, "sections": results}
    (out_dir / "results.json").write_text(json.dumps(record, indent=1, default=str))
    (out_dir / "summary.md").write_text(summary_markdown(record))
    return record


def _subprocess_section(name: str, out_dir: Path, args: argparse.Namespace, env: dict[str, str], limit: float):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out_dir)]
    cmd += ["--budget-s", str(int(limit))] + (["--data", args.data] if args.data else [])
    cmd += ["--dry-run"] if args.dry_run else []
    log = out_dir / f"{name}.log"
    tick = time.perf_counter()
    try:
        with log.open("w") as f:
            subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit)
        result = json.loads((out_dir / f"{name}.json").read_text())
    except subprocess.TimeoutExpired:
        result = {"status": "failed", "problems": [f"timed out after {limit:.0f} s"]}
    except (OSError, ValueError) as e:  # it died before writing its result
        tail = log.read_text().splitlines()[-3:] if log.exists() else []
        result = {"status": "failed", "problems": [f"crashed ({type(e).__name__}); log: {' | '.join(tail)}"]}
    result["seconds"] = time.perf_counter() - tick
    return result


def _header(dry: bool) -> dict[str, str]:
    import torch

    from benchmarks.devices import run_header

    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    return {**run_header(device), "mode": "dry run (CPU, tiny model)" if dry else "GPU"}


# ------------------------------------------------------------------------------------------ reports
def summary_markdown(record: dict[str, Any]) -> str:
    header = header_lines(record["header"])
    rows = []
    for name, r in record["sections"].items():
        note = "; ".join(r.get("problems", [])) or r.get("skipped", "") or _highlight(name, r)
        rows.append([name, r["status"], f"{r.get('seconds', 0):.0f}", note[:300]])
    lines = [f"**gpu-check** — {header}", "", format_table(["section", "status", "s", "notes"], rows)]
    for name in ("compiled_step", "fsdp_step"):
        modes = record["sections"].get(name, {}).get("modes")
        if not modes:
            continue
        table = []
        for ac, m in modes.items():
            table.append([
                ac, m.get("graph_breaks"), m.get("blocks_per_step"), m.get("compiled_regions_per_step"),
                m.get("eager_block_calls_per_step"),
                m.get("recompiles_after_warmup"), len(m.get("host_syncs", [])), _num(m.get("losses", [None])[0]),
                _num(m.get("eager_first_loss")), _num(m.get("images_per_s")), _num(m.get("warmup_s")),
            ])  # fmt: skip
        columns = [
            "AC", "graph breaks", "blocks/step", "compiled regions/step", "eager block calls/step",
            "recompiles after warm-up", "host syncs",
            "loss (compiled)", "loss (eager)", "img/s", "warm-up s",
        ]  # fmt: skip
        lines += ["", f"`{name}`:", "", format_table(columns, table)]
    attention = record["sections"].get("attention", {}).get("backends")
    if attention:
        table = [
            [name, b.get("selected_under_no_grad"), _timing(b.get("fwd")), _timing(b.get("fwd+bwd"))]
            + [_num(b.get("prepare_s"))]
            for name, b in attention.items()
        ]
        tokens = record["sections"]["attention"].get("tokens")
        lines += ["", f"`attention` at T = {tokens}:", ""]
        lines.append(format_table(["backend", "selected (no_grad)", "fwd", "fwd+bwd", "metadata s"], table))
    return "\n".join(lines) + "\n"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _timing(value: Any) -> str:
    if isinstance(value, dict):
        peak = value.get("peak_gib")
        return f"{value['ms']:.2f} ms" + (f", {peak:.2f} GiB" if peak is not None else "")
    return "-" if value is None else str(value)


def _highlight(name: str, r: dict[str, Any]) -> str:
    if name == "pytest":
        return r.get("summary", "")
    if name == "throughput":
        return ", ".join(f"{row['model']}: {_num(row.get('images_per_s'))} img/s" for row in r.get("rows", []))
    if name == "cifar10_knn" and "row" in r:
        return f"k-NN top-1 (k=20) {_num(r['row'].get('k-NN top-1 (k=20)'))} % after {r['row'].get('steps')} steps"
    return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default: $OUT/gpu_check, else outputs/gpu_check)")
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny model, in-process, the paths the CPU has")
    p.add_argument("--isolate", action="store_true", help="with --dry-run: one process per section, as on the GPU")
    p.add_argument("--sections", default=None, help=f"comma list, in this order (default: {','.join(SECTIONS)})")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # one section, in this process
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total seconds (default %(default)s)")
    p.add_argument("--wheels", default=None, help="wheels to install when omegaconf is missing")
    p.add_argument("--data", default=None, help="CIFAR-10 blobs folder (default: .carry/cifar10, ../shared/data)")
    p.add_argument("--report", default=None, help="no run: render DIR/results.json (with --markdown)")
    p.add_argument("--markdown", default=None, help="write/update the gpu-check section of this markdown file")
    args = p.parse_args(argv)
    args.out = args.out or str(default_out())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.section:
        ensure_packages(Path(args.wheels) if args.wheels else None)
        return section_main(args)
    if args.report:
        record = json.loads((Path(args.report) / "results.json").read_text())
    else:
        record = run_all(args)
    text = summary_markdown(record)
    print(text)
    if args.markdown:
        section = "gpu-check-dry" if record.get("dry_run") else "gpu-check"
        print(f"summary written to {update_markdown(args.markdown, section, text)}")
    failed = [name for name, r in record["sections"].items() if r["status"] == "failed"]
    if failed:
        print(f"gpu_check: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
