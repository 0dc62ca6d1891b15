"""AdamW parameter groups: weight-decay exemptions, layer-wise lr decay, patch-embed lr multiplier.

Every group carries ``lr_multiplier`` and ``wd_multiplier``; each iteration the trainer sets
``lr = schedule_lr * lr_multiplier`` and ``weight_decay = schedule_wd * wd_multiplier``.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch
from torch import nn


def is_no_decay(name: str) -> bool:
    """The reference's exemptions (dinov2 ``utils/param_groups.py`` get_params_groups_with_decay, dinov3
    ``train/param_groups.py`` the same): biases, norm parameters and LayerScale ``gamma``. Position
    embedding, cls / mask / register tokens and the prototypes' weight-norm ``g`` are decayed."""
    return name.endswith(".bias") or "norm" in name or "gamma" in name


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings and tokens, ``i + 1`` for block ``i``, ``depth + 1`` for the rest."""
    if any(key in name for key in ("patch_embed", "pos_embed", "cls_token", "register_tokens", "mask_token")):
        return 0
    if ".blocks." in f".{name}":
        after = f".{name}".split(".blocks.", 1)[1]
        return int(after.split(".", 1)[0]) + 1
    return depth + 1


def param_groups(
    module: nn.Module,
    depth: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    backbone_prefix: str = "backbone.",
) -> list[dict]:
    """Group trainable parameters of ``module`` by (lr multiplier, wd multiplier, last layer).

    Group keys are plain numbers and booleans so that optimizer state dicts stay tensor/number only."""
    groups: dict[tuple[float, float, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = name.startswith(backbone_prefix)
        lid = layer_id(name.removeprefix(backbone_prefix), depth) if in_backbone else depth + 1
        lr_mult = layerwise_decay ** (depth + 1 - lid)
        if in_backbone and "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if is_no_decay(name) else 1.0
        key = (lr_mult, wd_mult, "last_layer" in name)
        groups[key].append(param)
    return [
        {
            "params": params,
            "lr_multiplier": key[0],
            "wd_multiplier": key[1],
            "is_last_layer": key[2],
        }
        for key, params in groups.items()
    ]


def build_optimizer(groups: list[dict], betas: tuple[float, float], fused: bool, device: torch.device):
    """AdamW over ``groups``; fused when asked for and supported on ``device``."""
    kwargs = {}
    if fused and device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, weight_decay=0.0, **kwargs)


def apply_schedule(
    optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, last_layer_lr: float | None = None
) -> None:
    """Set every group's lr and weight decay from the schedules' values and the group's multipliers; the
    prototype-layer groups (``is_last_layer``) take ``last_layer_lr`` (default ``lr``): 0 while frozen, as
    the reference's ``last_layer_lr_schedule`` (dinov2 ``train/train.py`` build_schedulers,
    apply_optim_scheduler)."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] and last_layer_lr is not None else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
