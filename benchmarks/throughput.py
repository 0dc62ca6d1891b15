"""Training throughput of the full DINOv2 recipe on one GPU, against a naive baseline in the same process.

For each model (ViT-S/14, B/14, L/14, g/14 from ``configs/train/vit*14.yaml``) the real
:class:`~dinov2.train.meta_arch.SSLMetaArch` is built and stepped exactly as the trainer steps it
(bf16 autocast, packed multi-crop forward with 2×224 + 8×98 crops, DINO + iBOT heads, KoLeo,
Sinkhorn-Knopp, efficient stochastic depth at the preset's rate, backward, clipping, AdamW, EMA
teacher) on synthetic batches already on the device (random crops, real iBOT block masks). Reported:
images/s (median step after warm-up, CUDA events), peak allocated memory, and MFU = analytic FLOPs
per step (``benchmarks.common.ssl_step_flops``, checked against ``torch.utils.flop_counter`` on the
eager step) / step time / a bf16 matmul peak measured in the same process.

The baseline, in the same process and at the same batch: a plain ViT (our backbone with classic
DropPath), one forward per crop group (globals, then locals), an EMA teacher forward on the globals,
no heads, no iBOT masks, an MSE of CLS tokens as the loss, bf16 autocast, eager, then clipping,
``torch.optim.AdamW`` and the EMA update. ``ratio`` = our images/s / the baseline's.

    python benchmarks/throughput.py                         # all four models, compile on, preset AC
    python benchmarks/throughput.py --models l --compile both --ac none,full
    python benchmarks/throughput.py --markdown docs/BENCHMARKS.md
    python benchmarks/throughput.py --device cpu --tiny     # CI: a tiny model, 2 steps, same table
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    amp_context,
    count_flops,
    format_table,
    free_memory,
    header_lines,
    is_oom,
    make_optimizer,
    matmul_peak,
    peak_memory_gib,
    reset_peak_memory,
    resolve_device,
    run_header,
    ssl_step_flops,
    time_steps,
    train_step,
    update_markdown,
)

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
    "ibot_head.out_dim=128",
    "ibot_head.hidden_dim=64",
    "ibot_head.bottleneck_dim=32",
]
COLUMNS = [
    "model", "batch", "compile", "AC", "img/s", "peak GiB", "MFU %",
    "baseline img/s", "ratio", "target", "met",
]  # fmt: skip
SYNTHETIC_BATCHES = 4  # distinct mask layouts cycled through (the number of masked patches varies)


@dataclass
class Row:
    model: str
    batch: int
    compile: bool
    ac: str
    images_per_s: float | None = None  # None: out of memory
    peak_gib: float | None = None
    mfu: float | None = None  # percent
    flops_per_step: float | None = None
    flops_check: float | None = None  # torch.utils.flop_counter count / analytic, on the eager step when it fits
    baseline_images_per_s: float | None = None
    baseline_batch: int | None = None
    ratio: float | None = None
    target: str = "-"
    met: str = "-"

    def cells(self) -> list[Any]:
        oom = self.images_per_s is None
        baseline = self.baseline_images_per_s
        if baseline is not None and self.baseline_batch not in (None, self.batch):
            baseline = f"{baseline:.1f} (bs {self.baseline_batch})"
        return [
            self.model, self.batch, "on" if self.compile else "off", self.ac,
            "OOM" if oom else self.images_per_s, self.peak_gib, self.mfu,
            baseline if baseline is not None else "OOM/-", self.ratio, self.target, self.met,
        ]  # fmt: skip


def target_of(key: str) -> tuple[str, Any]:
    """The issue's target for a model and a check of a :class:`Row` against it."""
    if key == "s":
        return "≥ 2.5× baseline", lambda r: r.ratio is not None and r.ratio >= 2.5
    if key == "l":
        return "≥ 2.0× baseline, MFU ≥ 50 %", lambda r: (r.ratio or 0) >= 2.0 and (r.mfu or 0) >= 50
    if key == "g":
        return "batch ≥ 32 fits", lambda r: r.batch >= 32 and r.images_per_s is not None
    return "-", None


# --------------------------------------------------------------------------------------- batches
def synthetic_batch(cfg: Any, batch_size: int, device: torch.device, seed: int) -> dict[str, Any]:
    """Random crops and real iBOT block masks, in the trainer's batch layout, on ``device``."""
    import numpy as np

    from dinov2.data.gpu_augmentations import batch_masks

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


# ---------------------------------------------------------------------------------------- the runs
def bench_ssl(
    cfg: Any, batch_size: int, device: torch.device, steps: int, warmup: int, count: bool, env: Any = None
) -> tuple[float, float | None, float, float | None]:
    """``(images/s, peak GiB, analytic FLOPs/step, counted / analytic FLOPs or None)`` of the real step.

    The count (``torch.utils.flop_counter``) runs on the first, eager step — before activation
    checkpointing and compilation are applied — and is compared with the analytic FLOPs of that batch."""
    from dinov2.distributed.env import DistEnv
    from dinov2.distributed.parallelize import parallelize
    from dinov2.train.schedules import ScheduleValues
    from dinov2.train.trainer import build_meta_arch

    torch.manual_seed(0)
    model = build_meta_arch(cfg, device)
    model.train()
    optimizer, last_layer = make_optimizer(model, cfg, device)
    batches = [synthetic_batch(cfg, batch_size, device, seed) for seed in range(SYNTHETIC_BATCHES)]
    values = ScheduleValues(lr=1e-4, weight_decay=0.04, momentum=0.994, teacher_temp=0.07, freeze_last_layer=False)
    cycle = itertools.cycle(batches)

    def step() -> None:
        train_step(model, optimizer, next(cycle), values, cfg, last_layer, device)

    check = None
    if count:
        try:
            counted = count_flops(step)  # batches[0]
            check = counted / ssl_step_flops(cfg, batch_size, batches[0]["n_masked_patches"])
        except (torch.OutOfMemoryError, RuntimeError) as e:  # the eager step may not fit without AC
            if not is_oom(e):
                raise
        if check is None:  # out of memory; freed here, once the traceback no longer holds the step's frames
            optimizer.zero_grad(set_to_none=True)
            free_memory(device)
    parallelize(model, cfg.distributed, env if env is not None else DistEnv(), device)
    reset_peak_memory(device)
    times = time_steps(step, steps, warmup, device)
    flops = statistics.mean(ssl_step_flops(cfg, batch_size, b["n_masked_patches"]) for b in batches)
    return batch_size / statistics.median(times), peak_memory_gib(device), flops, check


def bench_naive(cfg: Any, batch_size: int, device: torch.device, steps: int, warmup: int) -> float:
    """Images/s of the naive baseline step (see the module docstring)."""
    from dinov2.models import build_backbone

    torch.manual_seed(0)
    student = build_backbone(replace(cfg.model, drop_path_mode="classic")).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04)
    batches = [synthetic_batch(cfg, batch_size, device, seed) for seed in range(SYNTHETIC_BATCHES)]
    cycle = itertools.cycle(batches)
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

    times = time_steps(step, steps, warmup, device)
    return batch_size / statistics.median(times)


def run_baseline(cfg: Any, batch_size: int, device: torch.device, steps: int, warmup: int) -> tuple[float | None, int]:
    """The baseline at ``batch_size``, halving the batch on out-of-memory (its row says at which)."""
    while batch_size >= 1:
        try:
            return bench_naive(cfg, batch_size, device, steps, warmup), batch_size
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
    p.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    p.add_argument("--no-count", action="store_true", help="skip the flop_counter check of the analytic FLOPs")
    p.add_argument(
        "--fsdp", action="store_true", help="shard with FSDP2 at world size 1 (bf16 parameters; default: autocast only)"
    )
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--tiny", action="store_true", help="CI mode: tiny model, 2 steps, compile off (runs on CPU)")
    p.add_argument("--markdown", default=None, help="write/update the table in this markdown file")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--from-json", default=None, help="no measurement: report rows saved by --json (table, markdown)")
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value for every model")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> tuple[dict[str, str], list[Row]]:
    """Every requested (model, AC, compile) row, and the run header (date, device, versions, peak)."""
    if not args.fsdp:
        return _measure(args, None)
    from dinov2.distributed.env import distributed_session

    with distributed_session("auto", always=True) as env:
        return _measure(args, env)


def _measure(args: argparse.Namespace, env: Any) -> tuple[dict[str, str], list[Row]]:
    from dinov2.config import load_config

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

    peak, peak_dtype = matmul_peak(device)
    header = run_header(device)
    shown = f"{peak / 1e12:.1f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.1f} GFLOP/s"
    extra = {f"{peak_dtype} matmul peak": shown, "sharding": "FSDP2, world size 1" if args.fsdp else "none"}
    print(header_lines(header, extra), flush=True)

    rows: list[Row] = []
    for key in keys:
        name, preset, default_batch = MODELS[key]
        batch = args.batch_size or (4 if args.tiny else default_batch)
        sharding = f"distributed.fsdp={str(args.fsdp).lower()}"
        base = [sharding, f"data.batch_size_per_gpu={batch}"] + (TINY if args.tiny else [])
        if args.tiny:
            name = "tiny (vits14 recipe, D=32, depth 2)"
        target, check = target_of(key) if not args.tiny else ("-", None)
        baseline: tuple[float | None, int] | None = None
        for ac, compiled in itertools.product(acs, compiles):
            overrides = base + [f"distributed.compile={str(compiled).lower()}"] + list(args.overrides)
            if ac != "preset":
                overrides.append(f"distributed.activation_checkpointing={ac}")
            cfg = load_config(preset, overrides)
            row = Row(name, batch, compiled, cfg.distributed.activation_checkpointing, target=target)
            try:
                ips, gib, flops, check_ratio = bench_ssl(cfg, batch, device, steps, warmup, not args.no_count, env)
                row.images_per_s, row.peak_gib, row.flops_per_step = ips, gib, flops
                row.flops_check = check_ratio
                row.mfu = 100.0 * flops * ips / batch / peak
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_oom(e):
                    raise
            free_memory(device)
            if baseline is None and not args.no_baseline:
                baseline = run_baseline(cfg, batch, device, steps, warmup)
                free_memory(device)
            if baseline is not None and baseline[0] is not None:
                row.baseline_images_per_s, row.baseline_batch = baseline
                if row.images_per_s is not None:
                    row.ratio = row.images_per_s / baseline[0]
            if check is not None:
                row.met = "yes" if check(row) else "no"
            if row.flops_per_step is not None:
                checked = "not counted" if row.flops_check is None else f"flop_counter/analytic {row.flops_check:.4f}"
                print(f"  {name}: {row.flops_per_step / 1e12:.4g} TFLOP/step ({checked})", flush=True)
            rows.append(row)
            print(format_table(COLUMNS, [rows[-1].cells()]).splitlines()[-1], flush=True)

    return {**header, **extra, "tiny": str(args.tiny)}, rows


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
        Path(args.json).write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1))


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        header, rows = saved["header"], [Row(**r) for r in saved["rows"]]
    else:
        header, rows = measure(args)
    report(header, rows, args)
    return rows


if __name__ == "__main__":
    main()
