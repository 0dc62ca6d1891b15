"""Backbone state dicts in and out of other layouts: timm's ``vit_*_patch14_dinov2`` and HF
transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``.

Our layout is the one of the original facebookresearch/dinov2 checkpoints (``cls_token``,
``pos_embed``, ``register_tokens``, ``mask_token``, ``patch_embed.proj``, ``blocks.{i}.…``, ``norm``),
so those load as ``layout="ours"`` (their chunked ``blocks.{chunk}.{i}.…`` form too).

- ``export_state_dict(backbone_or_state, layout)``: ours → ``"ours" | "timm" | "hf"``;
- ``load_state_dict_any(state, layout="auto")``: any of them → ours;
- ``load_pretrained_backbone(path, …)``: a safetensors / torch file (or HF model folder) in any
  layout → our ``DinoVisionTransformer`` with the weights loaded strictly (a frozen teacher for
  distillation, features for evaluation).

Importing this package imports torch only; timm and transformers are never needed to convert.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from dinov2.config import ModelConfig
from dinov2.interop.common import (
    HEADS_BY_WIDTH,
    StateDict,
    infer_arch,
    ratio_for_width,
    swiglu_ratio_for_width,
)
from dinov2.interop.hf_layout import from_hf, hf_config_kwargs, to_hf
from dinov2.interop.timm_layout import from_timm, timm_model_kwargs, to_timm
from dinov2.models import ARCHS, build_backbone

if TYPE_CHECKING:
    from dinov2.models import DinoVisionTransformer

__all__ = [
    "LAYOUTS",
    "default_pos_embed_interpolation",
    "detect_layout",
    "export_state_dict",
    "from_hf",
    "from_timm",
    "hf_config_kwargs",
    "load_pretrained_backbone",
    "load_state_dict_any",
    "read_metadata",
    "read_state_dict",
    "timm_model_kwargs",
    "to_hf",
    "to_timm",
]

LAYOUTS = ("ours", "timm", "hf")

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+\.)")  # original dinov2 BlockChunk: blocks.{chunk}.{i}.
# checkpoint dicts holding a state dict
_WRAPPER_KEYS = ("state_dict", "model", "teacher_backbone", "backbone", "teacher", "module")


def _plain(state: Mapping[str, Any]) -> StateDict:
    """Detach, gather DTensors (a collective under FSDP: call on every rank) and drop the
    ``_orig_mod.`` / ``module.`` infixes of compiled and DDP-wrapped modules."""
    out: StateDict = {}
    for key, value in state.items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        if not isinstance(value, Tensor):
            raise TypeError(f"'{key}' is a {type(value).__name__}, not a tensor")
        key = key.replace("_orig_mod.", "")
        out[key.removeprefix("module.")] = value.detach()
    return out


def export_state_dict(backbone_or_state: nn.Module | Mapping[str, Tensor], layout: str = "ours", **kwargs) -> StateDict:
    """Our backbone (module or state dict) in ``layout``: ``"ours"``, ``"timm"`` (``to_timm``
    keywords: ``no_embed_class``) or ``"hf"`` (``to_hf`` keywords: ``naming="hub" | "modules"``)."""
    if isinstance(backbone_or_state, nn.Module):
        backbone_or_state = backbone_or_state.state_dict()
    state = _plain(backbone_or_state)
    if layout == "ours":
        if kwargs:
            raise TypeError(f"layout 'ours' takes no options, got {sorted(kwargs)}")
        return state
    if layout == "timm":
        return to_timm(state, **kwargs)
    if layout == "hf":
        return to_hf(state, **kwargs)
    raise ValueError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")


def detect_layout(state: Mapping[str, Any]) -> str:
    """``"hf"``, ``"ours"`` or ``"timm"`` from key names: HF by its ``embeddings.`` / ``encoder.layer.``
    modules (also nested under ``dinov2.``), ours by the keys timm lacks (``mask_token``,
    ``register_tokens``, SwiGLU ``mlp.w12``), timm by ``blocks.*`` without those."""
    keys = list(state)
    hf_markers = ("embeddings.", "encoder.layer.", "dinov2.embeddings.", "dinov2_with_registers.embeddings.")
    if any(k.startswith(hf_markers) for k in keys):
        return "hf"
    if any(k in ("mask_token", "register_tokens") or ".mlp.w12." in k for k in keys):
        return "ours"
    if "cls_token" in state and any(k.startswith("blocks.") for k in keys):
        return "timm"
    raise ValueError(
        "cannot tell the layout of this state dict (no cls_token / blocks.* / embeddings.* keys); "
        f"first keys: {keys[:5]} — pass prefix= to select the backbone inside a larger checkpoint"
    )


def load_state_dict_any(state: Mapping[str, Any], layout: str = "auto", **kwargs) -> StateDict:
    """A backbone state dict in ``layout`` (``"auto"`` detects it) → our layout. ``kwargs`` go to
    the converter (``from_timm``'s ``no_embed_class``)."""
    state = _plain(state)
    if layout == "auto":
        layout = detect_layout(state)
    if layout == "ours":
        return {_CHUNKED_BLOCK.sub(r"blocks.\1", k): v for k, v in state.items()}
    if layout == "timm":
        return from_timm(state, **kwargs)
    if layout == "hf":
        return from_hf(state, **kwargs)
    raise ValueError(f"unknown layout '{layout}' (choose from auto, {', '.join(LAYOUTS)})")


def read_state_dict(path: str | Path, prefix: str = "") -> StateDict:
    """Tensors of a ``.safetensors`` file, a torch file (``torch.load(weights_only=True)``; a
    checkpoint dict is unwrapped through its ``state_dict`` / ``model`` / ``teacher`` / ``module``
    entry) or a folder of ``*.safetensors`` (an HF model folder, shards merged). With ``prefix``,
    only the keys starting with it are kept, prefix removed (e.g. ``"backbone."``)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {path}")
        state: dict[str, Any] = {}
        for file in files:
            state.update(_read_file(file))
    else:
        state = _read_file(path)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise KeyError(f"no key of {path} starts with '{prefix}'")
    return state


def _read_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"{path}: a dict with non-tensor values and none of the keys {_WRAPPER_KEYS}")
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


#: safetensors metadata of our exports (``dinov2.train.export``): their format, and the interpolation mode
EXPORT_FORMAT = "dinov2-train backbone"
POS_EMBED_METADATA_KEY = "pos_embed_interpolation"


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (of every file of a folder, merged); ``{}`` for
    torch files."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out: dict[str, str] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                out.update(f.metadata() or {})
    return out


def default_pos_embed_interpolation(path: str | Path, num_register_tokens: int) -> str:
    """How weights from ``path`` interpolate position embeddings unless the config says otherwise:
    what our export recorded (``"ours"`` for exports older than the record), else as released —
    ``"reference"``, or ``"reference_reg"`` for weights with registers (dinov2 ``hub/backbones.py:27-28,
    107-108``): the released checkpoints, timm's and HF's copies of them."""
    meta = read_metadata(path)
    if POS_EMBED_METADATA_KEY in meta:
        return meta[POS_EMBED_METADATA_KEY]
    if meta.get("format") == EXPORT_FORMAT:
        return "ours"
    return "reference_reg" if num_register_tokens else "reference"


def _heads_from_hf_config(path: Path) -> int | None:
    """``num_attention_heads`` of the HF DINOv2 config.json in (or next to) ``path``, if any."""
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    if data.get("model_type") not in ("dinov2", "dinov2_with_registers"):
        return None
    return data.get("num_attention_heads")


def load_pretrained_backbone(
    path: str | Path,
    layout: str = "auto",
    model_cfg: ModelConfig | None = None,
    *,
    num_heads: int | None = None,
    prefix: str = "",
) -> DinoVisionTransformer:
    """Our ``DinoVisionTransformer`` with the weights of ``path`` (any layout) loaded strictly.

    The shape-determined architecture comes from the weights: width, depth, patch size, input
    channels, registers, FFN kind and width, biases, LayerScale presence and the position-embedding
    grid (``img_size``; the released DINOv2 weights are at 518 px and interpolate to other sizes).
    ``model_cfg`` supplies the rest (heads, attention backend, drop path, position-embedding
    interpolation: when it leaves ``pos_embed_interpolation`` unset, see
    :func:`default_pos_embed_interpolation` — released, timm and HF weights interpolate as released);
    where it sets ``embed_dim`` / ``depth`` / ``ffn_layer`` explicitly they must agree with the
    weights. Heads: ``num_heads``, else ``model_cfg.num_heads``, else the HF DINOv2 config.json in / next to ``path``,
    else the arch's default if its width matches, else by width (384 → 6, 768 → 12, 1024 → 16,
    1536 → 24, head dim 64)."""
    state = load_state_dict_any(read_state_dict(path, prefix), layout)
    found = infer_arch(state)
    cfg = model_cfg if model_cfg is not None else ModelConfig()
    for field in ("embed_dim", "depth", "ffn_layer"):
        wanted = getattr(cfg, field)
        if wanted is not None and wanted != found[field]:
            raise ValueError(f"model_cfg.{field}={wanted!r} but the weights in {path} have {found[field]!r}")

    dim = int(found["embed_dim"])
    spec = ARCHS.get(cfg.arch)
    heads = num_heads or cfg.num_heads or _heads_from_hf_config(Path(path))
    if heads is None and spec is not None and spec.embed_dim == dim:
        heads = spec.num_heads
    if heads is None:
        heads = HEADS_BY_WIDTH.get(dim)
    if heads is None:
        raise ValueError(f"cannot infer the number of heads for width {dim}: pass num_heads or model_cfg.num_heads")

    hidden = int(found["ffn_hidden"])
    if found["ffn_layer"] == "swiglu":
        mlp_ratio = swiglu_ratio_for_width(hidden, dim)
    else:
        mlp_ratio = ratio_for_width(hidden, dim)
    layerscale = (cfg.layerscale_init or 1e-5) if found["layerscale"] else None
    cfg = replace(
        cfg,
        img_size=found["img_size"],
        patch_size=found["patch_size"],
        in_chans=found["in_chans"],
        embed_dim=dim,
        depth=found["depth"],
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        ffn_layer=found["ffn_layer"],
        num_register_tokens=found["num_register_tokens"],
        layerscale_init=layerscale,
        qkv_bias=found["qkv_bias"],
        proj_bias=found["proj_bias"],
        ffn_bias=found["ffn_bias"],
        pos_embed_interpolation=cfg.pos_embed_interpolation
        or default_pos_embed_interpolation(path, int(found["num_register_tokens"])),
    )
    model = build_backbone(cfg)
    model.load_state_dict(state, strict=True)
    return model
