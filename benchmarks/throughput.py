"""Training throughput of the full DINOv2 recipe on one GPU, against a naive baseline in the same process.

For each model (ViT-S/14, B/14, L/14, g/14 from ``configs/train/vit*14.yaml``) the trainer's own path
runs: ``dinov2.launch.run.build_training`` (model → activation checkpointing, attention backend
resolution, per-block compile, FSDP2 sharding → optimizer over the sharded parameters) and
``train_step`` (bf16 autocast, packed multi-crop forward with 2×224 + 8×98 crops, DINO + iBOT heads,
KoLeo, Sinkhorn-Knopp, efficient stochastic depth at the preset's rate, backward, clipping, AdamW, EMA
teacher), on synthetic batches already on the device (random crops, real iBOT block masks) or, with
``--loader cpu|gpu``, on the real data pipeline (``build_loader``: CPU workers, or the batched GPU
augmentation) feeding the step — its own images/s alone is reported beside, so one sees whether loading
or the model bounds training. Reported: images/s (median step after warm-up, CUDA events), peak
allocated memory, and MFU = analytic FLOPs per step (``benchmarks.flops.ssl_step_flops``, checked
against ``torch.utils.flop_counter`` on an eager step of a separate copy) / step time / peak, against
a bf16 matmul peak measured in the same process *and* against the GPU's datasheet dense bf16 peak
(``benchmarks.devices.DATASHEET_BF16``, e.g. 989 TFLOP/s for H100/H200 SXM).

The baseline, in the same process and at the same batch: a plain ViT (our backbone with classic
DropPath), one forward per crop group (globals, then locals), an EMA teacher forward on the globals,
no heads, no iBOT masks, an MSE of CLS tokens as the loss, bf16 autocast, then clipping,
``torch.optim.AdamW`` and the EMA update — eager, and with its blocks compiled like ours when the row
is compiled. ``ratio`` = our images/s / the eager baseline's (the target's definition);
``ratio (compiled)`` = ours / the compiled baseline's.

    python benchmarks/throughput.py                         # all four models, compile on, preset AC
    python benchmarks/throughput.py --models l --compile both --ac none,full
    python benchmarks/throughput.py --models s --loader gpu data.dataset.kind=blobs data.dataset.path=…
    python benchmarks/throughput.py --markdown docs/BENCHMARKS.md
    python benchmarks/throughput.py --device cpu --tiny     # CI: a tiny model, 2 steps, same table
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.devices import (  # noqa: E402
    amp_context,
    datasheet_bf16_peak,
    free_memory,
    is_oom,
    peak_memory_gib,
    reset_peak_memory,
    resolve_device,
    run_header,
    synchronize,
)
from benchmarks.flops import count_flops, ssl_step_flops  # noqa: E402
from benchmarks.results import load_results, save_results  # noqa: E402
from benchmarks.tables import format_table, header_lines, update_markdown  # noqa: E402
from benchmarks.timing import matmul_peak, time_steps  # noqa: E402
from dinov2.config import load_config  # noqa: E402
from dinov2.data.collate import batch_masks  # noqa: E402
from dinov2.distributed.env import DistEnv, distributed_session  # noqa: E402
from dinov2.models import build_backbone  # noqa: E402
from dinov2.train.schedules import ScheduleValues  # noqa: E402

MODELS = {
    "s": ("ViT-S/14", "train/vits14", 128),
    "b": ("ViT-B/14", "train/vitb14", 64),
    "l": ("ViT-L/14", "train/vitl14", 32),
    "g": ("ViT-g/14", "train/vitg14", 32),
}
TINY = [  # a model and crops that step in milliseconds on a CPU core (the recipe's 2 + 8 crops kept)
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.patch_size=4",
    "model.img_size=16",
    "model.drop_path_rate=0.2",
    "data.crops.global_crops_size=16",
    "data.crops.local_crops_size=8",
    "dino_head.out_dim=128",
    "dino_head.hidden_dim=64",
    "dino_head.bottleneck_dim=32",
]
TINY_LOADER = [  # --tiny --loader: the package's demo images (no files needed), drawn at 16 px
    "data.dataset.kind=demo",
    "data.dataset.path=''",  # generated images, whatever folder the preset names
    "data.dataset.demo_num_train=64",
    "data.dataset.demo_image_size=16",
    "data.num_workers=0",
]
COLUMNS = [
    "model", "batch", "compile", "AC", "loader", "img/s", "loader img/s", "peak GiB", "MFU %", "MFU % datasheet",
    "baseline img/s", "baseline compiled img/s", "ratio", "ratio (compiled)", "target", "met",
]  # fmt: skip
SYNTHETIC_BATCHES = 4  # distinct mask layouts cycled through (the number of masked patches varies)
MEMORY_BUDGET_GIB = 80.0  # what the recipe must fit in: the 80 GB cards users train on (the H200 has 141)


@dataclass
class Row:
    model: str
    batch: int
    compile: bool
    ac: str
    loader: str = "synthetic"
    images_per_s: float | None = None  # None: out of memory
    loader_images_per_s: float | None = None  # the data pipeline alone (--loader)
    peak_gib: float | None = None
    mfu: float | None = None  # percent of the measured matmul peak
    mfu_datasheet: float | None = None  # percent of the datasheet dense bf16 peak (None: GPU not in the table)
    flops_per_step: float | None = None
    flops_check: float | None = None  # torch.utils.flop_counter count / analytic, on an eager step when it fits
    baseline_images_per_s: float | None = None  # eager naive baseline
    baseline_batch: int | None = None
    baseline_compiled_images_per_s: float | None = None  # naive baseline with compiled blocks (compiled rows)
    ratio: float | None = None  # ours / eager baseline
    ratio_compiled: float | None = None  # ours / compiled baseline
    target: str = "-"
    met: str = "-"

    def cells(self) -> list[Any]:
        oom = self.images_per_s is None
        baseline = self.baseline_images_per_s
        if baseline is not None and self.baseline_batch not in (None, self.batch):
            baseline = f"{baseline:.1f} (bs {self.baseline_batch})"
        return [
            self.model, self.batch, "on" if self.compile else "off", self.ac, self.loader,
            "OOM" if oom else self.images_per_s, self.loader_images_per_s, self.peak_gib, self.mfu,
            self.mfu_datasheet, baseline if baseline is not None else "OOM/-", self.baseline_compiled_images_per_s,
            self.ratio, self.ratio_compiled, self.target, self.met,
        ]  # fmt: skip


def target_of(key: str) -> tuple[str, Any]:
    """The issue's target for a model and a check of a :class:`Row` against it."""
    if key == "s":
        return "≥ 2.5× baseline", lambda r: r.ratio is not None and r.ratio >= 2.5
    if key == "l":
        return "≥ 2.0× baseline, MFU ≥ 50 %", lambda r: (r.ratio or 0) >= 2.0 and (r.mfu or 0) >= 50
    if key == "g":
        return (
            f"batch ≥ 32 fits in {MEMORY_BUDGET_GIB:.0f} GiB",
            lambda r: r.batch >= 32 and r.images_per_s is not None and (r.peak_gib or 0) <= MEMORY_BUDGET_GIB,
        )
    return "-", None


# --------------------------------------------------------------------------------------- batches
def synthetic_batch(cfg: Any, batch_size: int, device: torch.device, seed: int) -> dict[str, Any]:
    """Random crops and real iBOT block masks, in the trainer's batch layout, on ``device``."""
    c = cfg.data.crops
    gen = torch.Generator().manual_seed(seed)
    grid = (c.global_crops_size // cfg.model.patch_size,) * 2
    masks = batch_masks(2 * batch_size, grid, cfg.data.masks, np.random.default_rng(seed))
    batch = {
        "global_crops": torch.randn(2 * batch_size, 3, c.global_crops_size, c.global_crops_size, generator=gen),
        "local_crops": torch.randn(
            c.local_crops_number * batch_size, 3, c.local_crops_size, c.local_crops_size, generator=gen
        ),
        **masks,
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_source(cfg: Any, loader: str, batch_size: int, device: torch.device, env: Any):
    """An endless iterator of device batches: synthetic (cycled) or the trainer's own data pipeline."""
    if loader == "synthetic":
        return itertools.cycle([synthetic_batch(cfg, batch_size, device, seed) for seed in range(SYNTHETIC_BATCHES)])
    from dinov2.train.trainer import _to_device, build_loader  # lazy: the trainer adds ~0.9 s (FSDP) to --help

    pipeline = build_loader(replace(cfg, data=replace(cfg.data, pipeline=loader)), env, device, 0)
    return (_to_device(batch, device) for batch in pipeline)


def loader_rate(source: Any, batch_size: int, batches: int, device: torch.device) -> float:
    """Images/s of the data pipeline alone (after one warm-up batch)."""
    next(source)
    synchronize(device)
    tick = time.perf_counter()
    for _ in range(batches):
        next(source)
    synchronize(device)
    return batches * batch_size / (time.perf_counter() - tick)


# ---------------------------------------------------------------------------------------- the runs
def flop_check(cfg: Any, batch_size: int, device: torch.device, env: Any) -> float | None:
    """``torch.utils.flop_counter`` count / analytic FLOPs of one eager step of a separate, unparallelised
    copy of the model (so the timed model is built exactly as the trainer builds it); None when it does
    not fit."""
    from dinov2.launch.run import build_training  # lazy: the trainer adds ~0.9 s (FSDP) to --help

    eager = dict(compile=False, fsdp=False, activation_checkpointing="none")
    plain = replace(cfg, distributed=replace(cfg.distributed, **eager))
    check = None
    try:
        training = build_training(plain, DistEnv(), device)
        training.model.train()
        batch = synthetic_batch(cfg, batch_size, device, 0)
        values = ScheduleValues(lr=1e-4, weight_decay=0.04, momentum=0.994, teacher_temp=0.07, freeze_last_layer=False)
        counted = count_flops(lambda: training.step(batch, values))
        check = counted / ssl_step_flops(cfg, batch_size, batch["n_masked_patches"])
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
    training = batch = None
    free_memory(device)
    return check


def bench_ssl(
    cfg: Any,
    batch_size: int,
    device: torch.device,
    steps: int,
    warmup: int,
    env: Any,
    loader: str = "synthetic",
    cpu_time: bool = False,
) -> tuple[float, float | None, float, float | None]:
    """``(images/s, peak GiB, analytic FLOPs/step, loader-only images/s or None)`` of the trainer's step."""
    from dinov2.launch.run import build_training  # lazy: the trainer adds ~0.9 s (FSDP) to --help

    training = build_training(cfg, env, device)
    check_optimizer_holds(training.model, training.optimizer)
    training.model.train()
    source = batch_source(cfg, loader, batch_size, device, env)
    loader_ips = loader_rate(source, batch_size, max(steps, 2), device) if loader != "synthetic" else None
    values = ScheduleValues(lr=1e-4, weight_decay=0.04, momentum=0.994, teacher_temp=0.07, freeze_last_layer=False)
    seen: list[int] = []

    def step() -> None:
        batch = next(source)
        seen.append(batch["n_masked_patches"])
        training.step(batch, values)

    reset_peak_memory(device)
    times = time_steps(step, steps, warmup, device, cpu_time)
    flops = statistics.mean(ssl_step_flops(cfg, batch_size, n) for n in seen)
    return batch_size / statistics.median(times), peak_memory_gib(device), flops, loader_ips


def check_optimizer_holds(model: Any, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer must update the parameters the model trains with (sharded DTensors under FSDP2):
    an optimizer built before ``fully_shard`` holds stale tensors and nothing would train."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = {id(p) for net in model.trained_networks().values() for p in net.parameters() if p.requires_grad}
    if held != trained:
        raise RuntimeError(f"the optimizer holds {len(held & trained)} of the {len(trained)} trained parameters")


def bench_naive(
    cfg: Any, batch_size: int, device: torch.device, steps: int, warmup: int, compiled: bool, cpu_time: bool = False
) -> float:
    """Images/s of the naive baseline step (see the module docstring)."""
    from dinov2.distributed.parallelize import compile_blocks  # lazy: ~0.7 s (FSDP) on --help

    torch.manual_seed(0)
    student = build_backbone(replace(cfg.model, drop_path_mode="classic")).to(device)
    teacher = build_backbone(replace(cfg.model, drop_path_rate=0.0)).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False).eval()
    student.train()
    if compiled:
        compile_blocks([SimpleNamespace(backbone=student), SimpleNamespace(backbone=teacher)])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04)
    cycle = itertools.cycle([synthetic_batch(cfg, batch_size, device, seed) for seed in range(SYNTHETIC_BATCHES)])
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())

    def step() -> None:
        batch = next(cycle)
        with amp_context(device):
            with torch.no_grad():
                target = teacher(batch["global_crops"])["cls"]
            global_cls = student(batch["global_crops"])["cls"]
            local_cls = student(batch["local_crops"])["cls"]
            loss = torch.nn.functional.mse_loss(global_cls.float(), target.float()) + local_cls.float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student_params, cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_mul_(teacher_params, 0.994)
            torch._foreach_add_(teacher_params, student_params, alpha=0.006)

    times = time_steps(step, steps, warmup, device, cpu_time)
    return batch_size / statistics.median(times)


def run_baseline(
    cfg: Any, batch_size: int, device: torch.device, steps: int, warmup: int, compiled: bool, cpu_time: bool = False
) -> tuple[float | None, int]:
    """The baseline at ``batch_size``, halving the batch on out-of-memory (its row says at which)."""
    while batch_size >= 1:
        try:
            return bench_naive(cfg, batch_size, device, steps, warmup, compiled, cpu_time), batch_size
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
        free_memory(device)  # outside the handler: the traceback no longer holds the failed step
        batch_size //= 2
    return None, 0


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="s,b,l,g", help="comma list of s, b, l, g (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default: S 128, B 64, L 32, g 32)")
    p.add_argument("--compile", default="on", choices=["on", "off", "both"], help="per-block torch.compile")
    p.add_argument("--ac", default="preset", help="activation checkpointing, comma list of none|full|selective|preset")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument(
        "--loader",
        default="synthetic",
        choices=["synthetic", "cpu", "gpu"],
        help="batches: synthetic on the device (default), or the real pipeline: cpu workers (data.num_workers)\n"
        "or the batched device augmentation (data.pipeline=gpu); give the data set as overrides",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    p.add_argument("--no-count", action="store_true", help="skip the flop_counter check of the analytic FLOPs")
    p.add_argument(
        "--fsdp", action="store_true", help="shard with FSDP2 at world size 1 (bf16 parameters; default: autocast only)"
    )
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU only: time steps in this process's CPU seconds (robust on a shared machine; use one thread)",
    )
    p.add_argument("--tiny", action="store_true", help="CI mode: tiny model, 2 steps, compile off (runs on CPU)")
    p.add_argument("--markdown", default=None, help="write/update the table in this markdown file")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--from-json", default=None, help="no measurement: report rows saved by --json (table, markdown)")
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value for every model")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> tuple[dict[str, str], list[Row]]:
    """Every requested (model, AC, compile) row, and the run header (date, device, versions, peak)."""
    if not args.fsdp:
        return _measure(args, DistEnv())
    with distributed_session("auto", always=True) as env:
        return _measure(args, env)


def _measure(args: argparse.Namespace, env: Any) -> tuple[dict[str, str], list[Row]]:
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    for key in keys:
        if key not in MODELS:
            raise SystemExit(f"unknown model '{key}' (choose from {', '.join(MODELS)})")
    compiles = {"on": [True], "off": [False], "both": [False, True]}[args.compile]
    acs = [a.strip() for a in args.ac.split(",")]
    steps, warmup = args.steps, args.warmup
    if args.tiny:
        keys, compiles, steps, warmup = ["s"], [False], 2, 1

    cpu_time = args.cpu_time and device.type == "cpu"
    peak, peak_dtype = matmul_peak(device, cpu_time=cpu_time)
    datasheet = datasheet_bf16_peak(device)
    header = run_header(device)
    extra = {
        f"{peak_dtype} matmul peak": _flops(peak),
        "datasheet bf16 peak": _flops(datasheet) if datasheet else "-",
        "sharding": "FSDP2, world size 1" if args.fsdp else "none",
        **({"timing": "process CPU time"} if cpu_time else {}),
    }
    print(header_lines(header, extra), flush=True)

    rows: list[Row] = []
    for key in keys:
        name, preset, default_batch = MODELS[key]
        batch = args.batch_size or (4 if args.tiny else default_batch)
        sharding = f"distributed.fsdp={str(args.fsdp).lower()}"
        base = [sharding, f"data.batch_size_per_gpu={batch}"] + (TINY if args.tiny else [])
        if args.tiny and args.loader != "synthetic":
            base += TINY_LOADER
        if args.tiny:
            name = "tiny (vits14 recipe, D=32, depth 2)"
        target, check = target_of(key) if not args.tiny else ("-", None)
        baselines: dict[bool, tuple[float | None, int]] = {}
        flops_check = None
        if not args.no_count:
            flops_check = flop_check(load_config(preset, base + list(args.overrides)), batch, device, env)
        for ac, compiled in itertools.product(acs, compiles):
            overrides = base + [f"distributed.compile={str(compiled).lower()}"] + list(args.overrides)
            if ac != "preset":
                overrides.append(f"distributed.activation_checkpointing={ac}")
            cfg = load_config(preset, overrides)
            row = Row(name, batch, compiled, cfg.distributed.activation_checkpointing, args.loader, target=target)
            row.flops_check = flops_check
            try:
                ips, gib, flops, loader_ips = bench_ssl(cfg, batch, device, steps, warmup, env, args.loader, cpu_time)
                row.images_per_s, row.peak_gib, row.flops_per_step = ips, gib, flops
                row.loader_images_per_s = loader_ips
                row.mfu = 100.0 * flops * ips / batch / peak
                row.mfu_datasheet = 100.0 * flops * ips / batch / datasheet if datasheet else None
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_oom(e):
                    raise
            free_memory(device)
            for variant in sorted({False, compiled}):  # the eager baseline always, the compiled one for compiled rows
                if variant not in baselines and not args.no_baseline:
                    baselines[variant] = run_baseline(cfg, batch, device, steps, warmup, variant, cpu_time)
                    free_memory(device)
            eager, compiled_base = baselines.get(False), baselines.get(True) if compiled else None
            if eager is not None and eager[0] is not None:
                row.baseline_images_per_s, row.baseline_batch = eager
                if row.images_per_s is not None:
                    row.ratio = row.images_per_s / eager[0]
            if compiled_base is not None and compiled_base[0] is not None:
                row.baseline_compiled_images_per_s = compiled_base[0]
                if row.images_per_s is not None:
                    row.ratio_compiled = row.images_per_s / compiled_base[0]
            if check is not None:
                row.met = "yes" if check(row) else "no"
            if row.flops_per_step is not None:
                checked = "not counted" if row.flops_check is None else f"flop_counter/analytic {row.flops_check:.4f}"
                print(f"  {name}: {row.flops_per_step / 1e12:.4g} TFLOP/step ({checked})", flush=True)
            rows.append(row)
            print(format_table(COLUMNS, [rows[-1].cells()]).splitlines()[-1], flush=True)
            if args.json:  # after every row: a run cut short (a time limit) keeps what it measured
                save_json(args.json, {**header, **extra, "tiny": str(args.tiny)}, rows)

    return {**header, **extra, "tiny": str(args.tiny)}, rows


def save_json(path: str, header: dict[str, str], rows: list[Row]) -> None:
    save_results(path, header, [asdict(r) for r in rows])


def _flops(rate: float) -> str:
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


def report(header: dict[str, str], rows: list[Row], args: argparse.Namespace) -> None:
    table = format_table(COLUMNS, [r.cells() for r in rows])
    print()
    print(table)
    tiny = header.get("tiny") == "True"
    shown = {k: v for k, v in header.items() if k != "tiny"}
    if args.markdown:
        title = "CPU tiny mode (illustration, not a performance claim)" if tiny else "Throughput"
        body = f"**{title}** — {header_lines(shown)}\n\n{table}\n"
        section = "throughput-tiny" if tiny else "throughput"
        print(f"table written to {update_markdown(args.markdown, section, body)}")
    if args.json and not args.from_json:
        save_json(args.json, header, rows)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.from_json:
        header, saved = load_results(args.from_json)
        known = set(Row.__dataclass_fields__)
        rows = [Row(**{k: v for k, v in r.items() if k in known}) for r in saved]
    else:
        header, rows = measure(args)
    report(header, rows, args)
    return rows


if __name__ == "__main__":
    main()
