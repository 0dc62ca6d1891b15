"""Which device a command runs on and in which precision: the one home of ``--device`` / ``amp`` choices
for the trainer, evaluation, curation's embedding stage and the benchmarks."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

from dinov2.config import AmpName

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda``: GPU ``local_rank`` (default: the current
    one); any other name as ``torch.device`` reads it (``cpu``, ``cuda:1``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    return torch.device(name)


def amp_dtype(name: AmpName | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that ``name`` asks for on ``device``: ``auto`` is bf16 on CUDA and none (fp32)
    elsewhere; ``bf16``, ``fp16`` or ``none`` as named."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in _AMP_DTYPES:
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {name!r}")
    return _AMP_DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``dtype``; no autocast when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
