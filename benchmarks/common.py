"""Shared pieces of the benchmarks: devices, timing, FLOP counting, tables (the training step is the
trainer's own: ``dinov2.train.trainer.build_training`` and ``Training.step``).

Nothing here runs at import time; every benchmark imports torch and the project lazily enough that
``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ATEN = torch.ops.aten


# ------------------------------------------------------------------------------------------ devices
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu --tiny for the CI version)")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_header(device: torch.device) -> dict[str, str]:
    """Date, device and software versions, as printed above every table."""
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": (torch.version.cuda or "-") if device.type == "cuda" else "-",
    }


def amp_context(device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """bf16 autocast on CUDA; fp32 on CPU (what the trainer does)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------------------- timing
def time_steps(
    step: Callable[[], Any], steps: int, warmup: int, device: torch.device, cpu_time: bool = False
) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` untimed calls (CUDA events on GPU). ``cpu_time`` (CPU
    only): this process's CPU seconds instead of wall-clock seconds — with one thread, the step's work,
    whatever else runs on a shared machine."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    clock = time.process_time if cpu_time else time.perf_counter
    times = []
    for _ in range(steps):
        tick = clock()
        step()
        times.append(clock() - tick)
    return times


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, by a substring of the device name.
# The first match wins, so the more specific names come first.
DATASHEET_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM (HBM3)
    ("H200", 989e12),  # SXM
    ("A100", 312e12),
)


def datasheet_bf16_peak(device: torch.device) -> float | None:
    """The datasheet dense bf16 peak (FLOP/s) of ``device``'s GPU, or None when it is not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16 if key in name), None)


def matmul_peak(
    device: torch.device, size: int | None = None, iters: int = 10, cpu_time: bool = False
) -> tuple[float, str]:
    """Measured matmul throughput (FLOP/s, median over ``iters``) and its dtype: bf16 ``8192³`` on
    CUDA, fp32 ``512³`` on CPU (the dtype each device's training step computes in)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = time_steps(lambda: torch.mm(a, b), steps=iters, warmup=3, device=device, cpu_time=cpu_time)
    return 2 * size**3 / statistics.median(times), str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------- FLOPs
def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, n, d = query_shape
    s, dv = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * n * s * (d + dv)  # QKᵀ and PV


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_forward_flops(query_shape, key_shape, value_shape)  # dV, dP, dQ, dK


# torch counts the CUDA SDPA kernels; the CPU flash kernel is not in its table, so add it here
CPU_SDPA_FLOPS = {
    ATEN._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward_flops,
    ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul/conv/attention FLOPs executed by ``fn()`` (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def _kept(batch: int, p: float, training: bool) -> int:
    """Samples a residual branch computes on under efficient stochastic depth."""
    return max(1, int(batch * (1.0 - p))) if training and p > 0 else batch


def backbone_forward_flops(model_cfg: Any, groups: Sequence[tuple[int, int]], training: bool) -> int:
    """Forward FLOPs of our ViT over crop groups ``(batch, image side)``.

    Per block and sample of ``n`` tokens, width ``D``: attention branch ``8·n·D²`` (QKV ``6nD²`` +
    projection ``2nD²``) + ``4·n²·D`` (QKᵀ and PV); FFN branch ``4·n·D·h`` (MLP, ``h = ratio·D``) or
    ``6·n·D·h`` (SwiGLU, ``h`` from :func:`swiglu_hidden_dim`). Under efficient stochastic depth each
    branch runs on ``max(1, ⌊b·(1−p)⌋)`` of a group's ``b`` samples. Plus the patch embedding
    ``2·P·(3·p²)·D`` per sample of ``P`` patches. Norms, softmax and adds are not counted."""
    from dinov2.layers.mlp import swiglu_hidden_dim
    from dinov2.models.vision_transformer import ARCHS

    spec = ARCHS[model_cfg.arch]
    d = model_cfg.embed_dim or spec.embed_dim
    depth = model_cfg.depth or spec.depth
    ffn = model_cfg.ffn_layer or spec.ffn_layer
    if ffn == "swiglu":
        ffn_per_token = 6 * d * swiglu_hidden_dim(d, model_cfg.mlp_ratio)
    else:
        ffn_per_token = 4 * d * int(d * model_cfg.mlp_ratio)
    p = model_cfg.drop_path_rate if model_cfg.drop_path_mode == "efficient" else 0.0
    total = 0
    for b, side in groups:
        patches = (side // model_cfg.patch_size) ** 2
        n = 1 + model_cfg.num_register_tokens + patches
        attn = 8 * n * d * d + 4 * n * n * d
        kept = _kept(b, p, training)
        total += depth * kept * (attn + n * ffn_per_token)
        total += b * 2 * patches * model_cfg.in_chans * model_cfg.patch_size**2 * d
    return total


def head_forward_flops(head_cfg: Any, in_dim: int, rows: int) -> int:
    """``2·rows·(in·hidden + hidden²·(nlayers−2) + hidden·bottleneck + bottleneck·K)`` of a DINO head."""
    dims = [in_dim] + [head_cfg.hidden_dim] * (head_cfg.nlayers - 1) + [head_cfg.bottleneck_dim, head_cfg.out_dim]
    return 2 * rows * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


def ssl_step_flops(cfg: Any, batch_size: int, n_masked: int) -> int:
    """Analytic FLOPs of one self-distillation step (see docs/BENCHMARKS.md):
    ``3 × student forward`` (forward + backward) ``+ 1 × teacher forward`` (globals, no stochastic depth),
    where each forward is backbone + DINO head on the CLS rows + iBOT head on the ``n_masked`` patch rows.
    The patch embedding's backward computes no input gradient (``2×`` its forward, not ``3×``), and the
    KoLeo similarity (``2·B²·D`` per global view, forward only) is included."""
    from dinov2.models.vision_transformer import ARCHS

    c = cfg.data.crops
    d = cfg.model.embed_dim or ARCHS[cfg.model.arch].embed_dim
    global_group = (2 * batch_size, c.global_crops_size)
    local_group = (c.local_crops_number * batch_size, c.local_crops_size)
    student_groups = [global_group] + ([local_group] if c.local_crops_number else [])
    cls_rows = (2 + c.local_crops_number) * batch_size
    ibot_cfg = cfg.ibot_head if cfg.loss.ibot_separate_head else cfg.dino_head

    def heads(rows_cls: int) -> int:
        return head_forward_flops(cfg.dino_head, d, rows_cls) + head_forward_flops(ibot_cfg, d, n_masked)

    def patch_embed(groups: Sequence[tuple[int, int]]) -> int:
        return sum(b * 2 * (s // cfg.model.patch_size) ** 2 * 3 * cfg.model.patch_size**2 * d for b, s in groups)

    student = backbone_forward_flops(cfg.model, student_groups, training=True) + heads(cls_rows)
    teacher = backbone_forward_flops(cfg.model, [global_group], training=False) + heads(2 * batch_size)
    koleo = 2 * 2 * batch_size**2 * d if cfg.loss.koleo_weight else 0
    return 3 * student - patch_embed(student_groups) + teacher + koleo


# ------------------------------------------------------------------------------------------ tables
def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[str(c) for c in columns]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    return str(value)


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the first markdown table in ``text`` as dicts (used by the tests)."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return []
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def update_markdown(path: str | Path, section: str, body: str) -> Path:
    """Replace the text between ``<!-- {section}:begin -->`` and ``<!-- {section}:end -->`` in ``path``
    with ``body`` (appending the marked section when it is missing; creating the file if needed)."""
    path = Path(path)
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def header_lines(header: dict[str, str], extra: dict[str, str] | None = None) -> str:
    items = {**header, **(extra or {})}
    return "  ".join(f"{k}: {v}" for k, v in items.items())
