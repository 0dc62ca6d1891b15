"""Shared pieces of the layout converters: key patterns, the architecture of a backbone (read from a
module or inferred from a state dict in our layout) and FFN-width arithmetic.

Imports torch only; nothing here runs at import time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import Tensor, nn

from dinov2.layers import LayerScale, SwiGLUFFN

StateDict = dict[str, Tensor]

BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# the per-block parameters of our layout (and of the original facebookresearch/dinov2 checkpoints)
OUR_BLOCK_PARAM = re.compile(
    r"^(?:(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.(?:weight|bias)|ls[12]\.gamma)$"
)
OUR_TOP_LEVEL = ("cls_token", "pos_embed", "register_tokens", "mask_token")
OUR_STEM_PREFIXES = ("patch_embed.proj.", "norm.")

# number of attention heads of the standard widths (head dim 64), used when no config says otherwise
HEADS_BY_WIDTH: Mapping[int, int] = MappingProxyType({192: 3, 384: 6, 768: 12, 1024: 16, 1536: 24})


@dataclass(frozen=True)
class BackboneArch:
    """Everything about a backbone that a foreign layout's constructor needs."""

    img_size: int  # size the position embedding is learned at (grid * patch)
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    ffn_layer: str  # mlp | swiglu
    ffn_hidden: int  # hidden width of the FFN (for SwiGLU: of each of the gate/value halves)
    qkv_bias: bool
    proj_bias: bool
    ffn_bias: bool
    layerscale_init: float | None  # None: no LayerScale
    num_register_tokens: int


def describe(backbone: nn.Module) -> BackboneArch:
    """Architecture of one of our ``DinoVisionTransformer`` modules."""
    block = backbone.blocks[0]
    mlp = block.mlp
    swiglu = isinstance(mlp, SwiGLUFFN)
    first_ffn = mlp.w12 if swiglu else mlp.fc1
    conv = backbone.patch_embed.proj
    return BackboneArch(
        img_size=backbone.base_grid * backbone.patch_size,
        patch_size=backbone.patch_size,
        in_chans=conv.in_channels,
        embed_dim=backbone.embed_dim,
        depth=len(backbone.blocks),
        num_heads=block.attn.num_heads,
        ffn_layer="swiglu" if swiglu else "mlp",
        ffn_hidden=mlp.w3.in_features if swiglu else mlp.fc1.out_features,
        qkv_bias=block.attn.qkv.bias is not None,
        proj_bias=block.attn.proj.bias is not None,
        ffn_bias=first_ffn.bias is not None,
        layerscale_init=block.ls1.init_value if isinstance(block.ls1, LayerScale) else None,
        num_register_tokens=backbone.num_register_tokens,
    )


def block_indices(keys: object) -> list[int]:
    """Sorted block indices appearing in ``blocks.{i}.…`` keys."""
    found = {int(m.group(1)) for k in keys if (m := BLOCK_KEY.match(k))}
    return sorted(found)


def infer_arch(state: Mapping[str, Tensor]) -> dict[str, object]:
    """Shape-determined architecture fields of a state dict in our layout (no heads, no mlp ratio):
    img_size, patch_size, in_chans, embed_dim, depth, num_register_tokens, ffn_layer, ffn_hidden,
    qkv_bias, proj_bias, ffn_bias, layerscale (bool)."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise KeyError(f"state dict has no '{key}'; is it a ViT backbone in our layout?")
    proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    num_patches = state["pos_embed"].shape[1] - 1
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions, not a square grid")
    depth = len(block_indices(state))
    if depth == 0:
        raise ValueError("state dict has no transformer blocks")
    swiglu = "blocks.0.mlp.w12.weight" in state
    ffn_hidden = state["blocks.0.mlp.w3.weight"].shape[1] if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0]
    regs = state.get("register_tokens")
    return {
        "img_size": grid * patch_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_register_tokens": 0 if regs is None else regs.shape[1],
        "ffn_layer": "swiglu" if swiglu else "mlp",
        "ffn_hidden": ffn_hidden,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "proj_bias": "blocks.0.attn.proj.bias" in state,
        "ffn_bias": ("blocks.0.mlp.w12.bias" if swiglu else "blocks.0.mlp.fc1.bias") in state,
        "layerscale": "blocks.0.ls1.gamma" in state,
    }


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Our (and DINOv2's) SwiGLU width: 2/3 of ``dim * mlp_ratio`` rounded up to a multiple of 8."""
    return (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


def ratio_for_width(hidden: int, dim: int) -> float:
    """An ``mlp_ratio`` with ``int(dim * mlp_ratio) == hidden`` (the rule of plain MLPs), preferring
    the exact quotient and nudging it by half a unit when float rounding would floor one below."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def swiglu_ratio_for_width(hidden: int, dim: int) -> float:
    """An ``mlp_ratio`` for which our SwiGLU rule gives ``hidden`` (4.0 when it does)."""
    for ratio in (4.0, 1.5 * hidden / dim, (1.5 * hidden + 0.5) / dim):
        if swiglu_hidden(dim, ratio) == hidden:
            return ratio
    raise ValueError(f"no mlp_ratio gives a SwiGLU width of {hidden} for dim {dim} (not a multiple of 8?)")


def unknown_keys_error(layout: str, keys: list[str]) -> KeyError:
    shown = ", ".join(sorted(keys)[:8]) + (" …" if len(keys) > 8 else "")
    return KeyError(f"{len(keys)} key(s) not understood in the {layout} layout: {shown}")
