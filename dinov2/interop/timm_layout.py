"""timm's ``VisionTransformer`` layout as used by its ``vit_*_patch14_dinov2`` / ``…_reg4_dinov2`` models.

What differs from our layout (timm 1.0):

- register tokens are ``reg_token`` (1, R, D) instead of ``register_tokens``;
- timm has no mask token (dropped on export, zeros on import);
- SwiGLU is timm's ``SwiGLUPacked`` (``GluMlp`` with ``gate_last=False``): ``mlp.fc1`` is one
  ``(2H, D)`` linear whose output is chunked into ``(x1, x2)`` and combined as ``silu(x1) * x2``, so
  it is our ``mlp.w12`` (rows ``[gate; value]``) unchanged, and ``mlp.fc2`` is ``mlp.w3``. timm's
  split ``SwiGLU`` (``mlp.fc1_g`` gate, ``mlp.fc1_x`` value) is accepted on import as well;
- position embeddings. Without registers timm's DINOv2 models keep the class position inside
  ``pos_embed`` (1, 1+N, D) — identical to ours. The register models are built with
  ``no_embed_class=True``: ``pos_embed`` holds the N patch positions only, so the class position is
  folded into ``cls_token`` (``cls + pos[0]``, the value the class token has after embedding anyway)
  and comes back as ``cls_token = folded, pos_embed[0] = 0`` — the same function, but not the same
  tensors. ``no_embed_class=False`` with registers instead lays ``pos_embed`` out as
  ``[cls pos, R zero rows, patch pos]`` (timm adds it after concatenating [cls, regs, patches]),
  which round-trips exactly.

Everything else (``patch_embed.proj``, ``blocks.{i}.norm1 / attn.qkv / attn.proj / ls1.gamma / norm2
/ mlp.fc1 / mlp.fc2 / ls2.gamma``, ``norm``) has the same names and shapes. Both directions map
``dict[str, Tensor] -> dict[str, Tensor]`` with torch only; ``timm_model_kwargs`` imports timm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dinov2.interop.common import (
    BLOCK_KEY,
    OUR_BLOCK_PARAM,
    OUR_STEM_PREFIXES,
    StateDict,
    describe,
    ratio_for_width,
    unknown_keys_error,
)

# keys of timm classification models that are not part of the backbone
_TIMM_HEAD_PREFIXES = ("head.", "fc_norm.", "head_drop.")


def to_timm(state: Mapping[str, Tensor], *, no_embed_class: bool | None = None) -> StateDict:
    """Our layout → timm's. ``no_embed_class`` picks the position-embedding layout; by default it is
    True exactly when there are register tokens, as in timm's ``*_reg4_dinov2`` models. The mask
    token is dropped (timm has none)."""
    regs = state.get("register_tokens")
    num_regs = 0 if regs is None else regs.shape[1]
    if no_embed_class is None:
        no_embed_class = num_regs > 0
    cls, pos = state["cls_token"], state["pos_embed"]

    out: StateDict = {}
    if no_embed_class:
        out["cls_token"] = cls + pos[:, :1].to(cls.dtype)
        out["pos_embed"] = pos[:, 1:].clone()
    elif num_regs:
        zeros = pos.new_zeros(pos.shape[0], num_regs, pos.shape[2])
        out["cls_token"] = cls
        out["pos_embed"] = torch.cat([pos[:, :1], zeros, pos[:, 1:]], dim=1)
    else:
        out["cls_token"] = cls
        out["pos_embed"] = pos
    if regs is not None:
        out["reg_token"] = regs

    unknown = []
    for key, value in state.items():
        if key in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
            continue
        match = BLOCK_KEY.match(key)
        if match and OUR_BLOCK_PARAM.match(match.group(2)):
            sub = match.group(2).replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")
            out[f"blocks.{match.group(1)}.{sub}"] = value
        elif key.startswith(OUR_STEM_PREFIXES):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise unknown_keys_error("our", unknown)
    return out


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def timm_pos_embed_has_prefix(pos_len: int, num_regs: int) -> bool:
    """Whether a timm ``pos_embed`` of ``pos_len`` rows includes the prefix (class + register) rows.

    With registers a length can fit both readings (e.g. 9 = 3×3 patches, or 1 + 4 + 2×2); the
    ``no_embed_class`` layout of timm's register models wins then — pass ``no_embed_class`` to
    ``from_timm`` to decide otherwise."""
    with_prefix = _is_square(pos_len - 1 - num_regs)
    without_prefix = _is_square(pos_len)
    if not (with_prefix or without_prefix):
        raise ValueError(f"timm pos_embed of {pos_len} rows fits no square patch grid ({num_regs} registers)")
    return with_prefix and not (without_prefix and num_regs > 0)


def from_timm(state: Mapping[str, Tensor], *, no_embed_class: bool | None = None) -> StateDict:
    """timm's layout → ours. The position-embedding layout is detected from its length unless
    ``no_embed_class`` is given; classification-head keys (``head.*``) are ignored; the mask token
    is filled with zeros."""
    cls, pos = state["cls_token"], state["pos_embed"]
    regs = state.get("reg_token")
    num_regs = 0 if regs is None else regs.shape[1]
    if no_embed_class is None:
        no_embed_class = not timm_pos_embed_has_prefix(pos.shape[1], num_regs)

    out: StateDict = {"cls_token": cls}
    if no_embed_class:
        out["pos_embed"] = torch.cat([pos.new_zeros(pos.shape[0], 1, pos.shape[2]), pos], dim=1)
    else:
        out["pos_embed"] = torch.cat([pos[:, :1], pos[:, 1 + num_regs :]], dim=1) if num_regs else pos
    if regs is not None:
        out["register_tokens"] = regs
        reg_pos = None if no_embed_class else pos[:, 1 : 1 + num_regs]
        if reg_pos is not None and reg_pos.any():  # timm adds these rows; ours have none, so fold them in
            out["register_tokens"] = regs + reg_pos.to(regs.dtype)
    out["mask_token"] = cls.new_zeros(1, cls.shape[-1])

    mlps: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key in ("cls_token", "pos_embed", "reg_token") or key.startswith(_TIMM_HEAD_PREFIXES):
            continue
        match = BLOCK_KEY.match(key)
        if match and match.group(2).startswith("mlp."):
            mlps.setdefault(match.group(1), {})[match.group(2)[len("mlp.") :]] = value
        elif match and OUR_BLOCK_PARAM.match(match.group(2)):
            out[key] = value
        elif key.startswith(OUR_STEM_PREFIXES):
            out[key] = value
        else:
            unknown.append(key)
    for index, params in mlps.items():
        out.update(_mlp_from_timm(f"blocks.{index}.mlp.", params, unknown))
    if unknown:
        raise unknown_keys_error("timm", unknown)
    return out


def _mlp_from_timm(prefix: str, params: dict[str, Tensor], unknown: list[str]) -> StateDict:
    """One block's FFN: plain MLP (fc1 H×D, fc2 D×H), SwiGLUPacked (fc1 2H×D, fc2 D×H) or split
    SwiGLU (fc1_g, fc1_x, fc2)."""
    out: StateDict = {}
    if "fc1_g.weight" in params:
        for kind in ("weight", "bias"):
            if f"fc1_g.{kind}" in params:
                out[f"{prefix}w12.{kind}"] = torch.cat([params.pop(f"fc1_g.{kind}"), params.pop(f"fc1_x.{kind}")])
            if f"fc2.{kind}" in params:
                out[f"{prefix}w3.{kind}"] = params.pop(f"fc2.{kind}")
    elif "fc1.weight" in params and "fc2.weight" in params:
        packed = params["fc1.weight"].shape[0] == 2 * params["fc2.weight"].shape[1]
        names = {"fc1": "w12", "fc2": "w3"} if packed else {"fc1": "fc1", "fc2": "fc2"}
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                if f"{src}.{kind}" in params:
                    out[f"{prefix}{dst}.{kind}"] = params.pop(f"{src}.{kind}")
    unknown.extend(prefix + k for k in params)
    return out


def timm_model_kwargs(backbone: nn.Module, *, no_embed_class: bool | None = None) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model("vit_base_patch14_dinov2", **kw)`` (any of the
    ``vit_*_patch14*_dinov2`` names: these override every architecture field) or for
    ``timm.models.vision_transformer.VisionTransformer(**kw)`` that reproduce ``backbone``: headless
    (``num_classes=0``), dynamic input size, position-embedding layout matching ``to_timm`` with
    the same ``no_embed_class``. Imports timm for the SwiGLU layer."""
    arch = describe(backbone)
    if arch.proj_bias != arch.ffn_bias:
        raise ValueError("timm ties the FFN biases to proj_bias; this backbone has proj_bias != ffn_bias")
    if no_embed_class is None:
        no_embed_class = arch.num_register_tokens > 0
    kwargs: dict[str, Any] = {
        "img_size": arch.img_size,
        "patch_size": arch.patch_size,
        "in_chans": arch.in_chans,
        "num_classes": 0,
        "global_pool": "token",
        "embed_dim": arch.embed_dim,
        "depth": arch.depth,
        "num_heads": arch.num_heads,
        "qkv_bias": arch.qkv_bias,
        "proj_bias": arch.proj_bias,
        "init_values": arch.layerscale_init,
        "class_token": True,
        "reg_tokens": arch.num_register_tokens,
        "no_embed_class": no_embed_class,
        "dynamic_img_size": True,
    }
    if arch.ffn_layer == "swiglu":
        from timm.layers import SwiGLUPacked  # optional dependency (timm is not required)

        # timm's Block builds mlp_layer(hidden_features=int(dim * mlp_ratio)) = both halves together
        kwargs["mlp_ratio"] = ratio_for_width(2 * arch.ffn_hidden, arch.embed_dim)
        kwargs["mlp_layer"] = SwiGLUPacked
        kwargs["act_layer"] = "silu"  # the Block passes act_layer to the MLP, overriding the partial's
    else:
        kwargs["mlp_ratio"] = ratio_for_width(arch.ffn_hidden, arch.embed_dim)
    return kwargs
