"""The benchmarks' device facts: which device, synchronising, peak memory, the datasheet bf16 peaks,
and the header (date, device, versions) printed above every table."""

from __future__ import annotations

import datetime
import gc
import platform

import torch

from dinov2.device import autocast
from dinov2.device import resolve_device as library_resolve


def resolve_device(name: str) -> torch.device:
    """``dinov2.device.resolve_device``, refusing a CUDA device that is not there."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu --tiny for the CI version)")
    return library_resolve(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_header(device: torch.device) -> dict[str, str]:
    """Date, device and software versions, as printed above every table."""
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": (torch.version.cuda or "-") if device.type == "cuda" else "-",
    }


def amp_context(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU (what the trainer does)."""
    return autocast(device, torch.bfloat16 if device.type == "cuda" else None)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


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
