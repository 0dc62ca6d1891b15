"""Gradient clipping of a trained network: each sub-module on its own (the reference), or one global norm.

The reference clips the student's backbone, DINO head and iBOT head separately, each to ``clip_grad``
(dinov2 ``train/train.py``: ``for v in model.student.values(): v.clip_grad_norm_(cfg.optim.clip_grad)``;
dinov3 ``train/train.py`` the same with ``torch.nn.utils.clip_grad_norm_`` per student module). A
backbone gradient spike then leaves the heads' step alone: at initialisation of a ViT-S/14 the
backbone's norm is hundreds of times the DINO head's, so one global norm would shrink the heads' step
by that factor whenever the backbone spikes. ``optim.clip_grad_mode=global`` clips one norm over the
whole network instead.

Norms are over all shards of all ranks (FSDP2 DTensor gradients are reduced with ``full_tensor``, in
:func:`dinov2.distributed.parallelize.clip_grad_norm`), so every rank scales by the same factor.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import Tensor, nn

from dinov2.config import ClipMode
from dinov2.distributed.parallelize import clip_grad_norm


def clipped_modules(network: nn.Module) -> dict[str, nn.Module]:
    """The reference's clipping units of a backbone+heads network: ``backbone``, ``dino_head`` and, when
    the iBOT head is separate, ``ibot_head`` (a shared head is one unit, as in the reference). A network
    without heads (the copy detector's) is one unit, its backbone."""
    names = ("backbone", "dino_head", "ibot_head")
    return {name: getattr(network, name) for name in names if getattr(network, name, None) is not None}


def clip_gradients(network: nn.Module, max_norm: float, mode: ClipMode = "per_module") -> dict[str, Tensor]:
    """Clip the gradients of ``network`` to ``max_norm`` (``<= 0``: measure only) per sub-module
    (:func:`clipped_modules`) or over the whole network (``mode="global"``).

    Returns the norms before clipping, for logging: one per sub-module under its name, and ``total``,
    the norm over the whole network (``sqrt`` of the sum of the squared sub-module norms)."""
    if mode not in get_args(ClipMode):
        raise ValueError(f"unknown clip mode '{mode}' (expected {' or '.join(get_args(ClipMode))})")
    modules = clipped_modules(network)
    norms = {name: clip_grad_norm(module, 0.0) for name, module in modules.items()}  # measured, not clipped
    total = torch.stack([n.float() for n in norms.values()]).square().sum().sqrt()
    if max_norm > 0:
        for name, module in modules.items():
            grads = [p for p in module.parameters() if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norms[name] if mode == "per_module" else total)
    return {**norms, "total": total}
