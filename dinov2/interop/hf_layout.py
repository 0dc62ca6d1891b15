"""Hugging Face transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` layout.

Two namings of the same tensors exist:

- ``"hub"`` — what the ``facebook/dinov2-*`` checkpoints on the Hub hold and what transformers 4.x
  modules are called: ``encoder.layer.{i}.attention.attention.{query,key,value}``,
  ``attention.output.dense``, SwiGLU ``mlp.weights_in`` (one ``(2H, D)`` linear chunked into
  ``(gate, value)`` with ``silu(gate) * value``, i.e. our ``mlp.w12`` unchanged) and
  ``mlp.weights_out``. transformers 5.x renames these on ``from_pretrained``, so a hub-named file
  loads in both major versions.
- ``"modules"`` — the parameter names of transformers 5.x modules (what ``model.state_dict()``
  returns there): ``attention.{q,k,v}_proj``, ``attention.o_proj``, SwiGLU ``mlp.gate_proj`` /
  ``mlp.up_proj`` (the two halves of ``w12``) / ``mlp.down_proj``.

Common to both: ``embeddings.cls_token`` (1, 1, D), ``embeddings.mask_token`` (1, D) — same shape as
ours —, ``embeddings.position_embeddings`` (1, 1+N, D) with the class position first, exactly like
ours, ``embeddings.register_tokens`` (1, R, D) inserted after the class token once positions are
added (as ours), ``embeddings.patch_embeddings.projection``, ``encoder.layer.{i}.norm1 / norm2 /
layer_scale1.lambda1 / layer_scale2.lambda1 / mlp.fc1 / mlp.fc2`` and the final ``layernorm``.

HF always has LayerScale and output-projection / FFN biases: a backbone without them exports
``lambda1 = 1`` and zero biases (the same function). Both directions map ``dict[str, Tensor] ->
dict[str, Tensor]`` with torch only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from dinov2.interop.common import (
    BLOCK_KEY,
    OUR_BLOCK_PARAM,
    StateDict,
    block_indices,
    describe,
    unknown_keys_error,
)

NAMINGS = ("hub", "modules")

_HF_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_STEM_TO_HF = (
    ("cls_token", "embeddings.cls_token"),
    ("mask_token", "embeddings.mask_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("register_tokens", "embeddings.register_tokens"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
)
# block modules that only get renamed (ours → HF, the same in both namings)
_RENAMED = (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
# per naming: attention q/k/v, attention output, SwiGLU in (packed or [gate, up]), SwiGLU out
_NAMES: Mapping[str, tuple[tuple[str, ...], str, tuple[str, ...], str]] = MappingProxyType(
    {
        "hub": (
            ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
            "attention.output.dense",
            ("mlp.weights_in",),
            "mlp.weights_out",
        ),
        "modules": (
            ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
            "attention.o_proj",
            ("mlp.gate_proj", "mlp.up_proj"),
            "mlp.down_proj",
        ),
    }
)
# HF checkpoints of task models nest the backbone under one of these; their heads are ignored
_HF_BACKBONE_PREFIXES = ("dinov2.", "dinov2_with_registers.")
_HF_HEAD_PREFIXES = ("classifier.",)


def _names(naming: str) -> tuple[tuple[str, ...], str, tuple[str, ...], str]:
    if naming not in NAMINGS:
        raise ValueError(f"unknown HF naming '{naming}' (choose from {', '.join(NAMINGS)})")
    return _NAMES[naming]


def to_hf(state: Mapping[str, Tensor], *, naming: str = "hub") -> StateDict:
    """Our layout → HF Dinov2 (``naming="hub"``: Hub checkpoint / transformers 4.x names;
    ``"modules"``: transformers 5.x parameter names). Split tensors are copies, so the result can be
    written with safetensors."""
    qkv_names, out_name, in_names, w3_name = _names(naming)
    stem = dict(_STEM_TO_HF)
    renamed = dict(_RENAMED)
    out: StateDict = {}
    unknown = []
    for key, value in state.items():
        if key in stem:
            out[stem[key]] = value
            continue
        match = BLOCK_KEY.match(key)
        if not (match and OUR_BLOCK_PARAM.match(match.group(2))):
            unknown.append(key)
            continue
        layer = f"encoder.layer.{match.group(1)}."
        module, _, kind = match.group(2).rpartition(".")
        if module in renamed:
            out[f"{layer}{renamed[module]}.{kind}"] = value
        elif module == "attn.qkv":
            for name, part in zip(qkv_names, value.chunk(3, dim=0), strict=True):
                out[f"{layer}{name}.{kind}"] = part.clone()
        elif module == "attn.proj":
            out[f"{layer}{out_name}.{kind}"] = value
        elif module == "mlp.w12":
            parts = value.chunk(len(in_names), dim=0)
            for name, part in zip(in_names, parts, strict=True):
                out[f"{layer}{name}.{kind}"] = part.clone() if len(parts) > 1 else part
        elif module == "mlp.w3":
            out[f"{layer}{w3_name}.{kind}"] = value
        else:  # ls1.gamma / ls2.gamma
            out[f"{layer}layer_scale{module[-1]}.lambda1"] = value
    if unknown:
        raise unknown_keys_error("our", unknown)
    _fill_hf_defaults(out, state, naming)
    return out


def _fill_hf_defaults(out: StateDict, state: Mapping[str, Tensor], naming: str) -> None:
    """HF has LayerScale and output/FFN biases everywhere; add the neutral values where ours has none."""
    _, out_name, in_names, w3_name = _names(naming)
    ref = state["cls_token"]
    dim = ref.shape[-1]
    if "embeddings.mask_token" not in out:
        out["embeddings.mask_token"] = ref.new_zeros(1, dim)
    for i in block_indices(state):
        layer = f"encoder.layer.{i}."
        for n in (1, 2):
            out.setdefault(f"{layer}layer_scale{n}.lambda1", ref.new_ones(dim))
        out.setdefault(f"{layer}{out_name}.bias", ref.new_zeros(dim))
        if f"{layer}mlp.fc1.weight" in out:
            out.setdefault(f"{layer}mlp.fc1.bias", ref.new_zeros(out[f"{layer}mlp.fc1.weight"].shape[0]))
            out.setdefault(f"{layer}mlp.fc2.bias", ref.new_zeros(dim))
        else:
            hidden = out[f"{layer}{w3_name}.weight"].shape[1]
            for name in in_names:
                out.setdefault(f"{layer}{name}.bias", ref.new_zeros(hidden * 2 // len(in_names)))
            out.setdefault(f"{layer}{w3_name}.bias", ref.new_zeros(dim))


def _strip_hf_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop task heads and the ``dinov2.`` nesting of task models."""
    body = {k: v for k, v in state.items() if not k.startswith(_HF_HEAD_PREFIXES)}
    for prefix in _HF_BACKBONE_PREFIXES:
        if body and all(k.startswith(prefix) for k in body):
            return {k[len(prefix) :]: v for k, v in body.items()}
    return body


def from_hf(state: Mapping[str, Tensor]) -> StateDict:
    """HF Dinov2 (either naming, also nested under ``dinov2.`` in task models) → our layout. A model
    built with ``use_mask_token=False`` gets a zero mask token."""
    stem = {hf: ours for ours, hf in _STEM_TO_HF}
    renamed = {hf: ours for ours, hf in _RENAMED}
    single = {}  # HF module name → our module name, both namings
    split = {}  # HF module name → (our module, part index, number of parts)
    for naming in NAMINGS:
        qkv_names, out_name, in_names, w3_name = _NAMES[naming]
        single[out_name] = "attn.proj"
        single[w3_name] = "mlp.w3"
        split.update({name: ("attn.qkv", j, 3) for j, name in enumerate(qkv_names)})
        split.update({name: ("mlp.w12", j, len(in_names)) for j, name in enumerate(in_names)})

    out: StateDict = {}
    parts: dict[str, list[Tensor | None]] = {}
    unknown = []
    for key, value in _strip_hf_prefix(state).items():
        if key in stem:
            out[stem[key]] = value
            continue
        match = _HF_LAYER_KEY.match(key)
        if not match:
            unknown.append(key)
            continue
        index, module, kind = match.groups()
        block = f"blocks.{index}."
        if kind == "lambda1" and module in ("layer_scale1", "layer_scale2"):
            out[f"{block}ls{module[-1]}.gamma"] = value
        elif module in renamed:
            out[f"{block}{renamed[module]}.{kind}"] = value
        elif module in single:
            out[f"{block}{single[module]}.{kind}"] = value
        elif module in split:
            ours, j, n = split[module]
            slots = parts.setdefault(f"{block}{ours}.{kind}", [None] * n)
            slots[j] = value
        else:
            unknown.append(key)
    for key, slots in parts.items():
        if any(s is None for s in slots):
            raise KeyError(f"incomplete split tensor for '{key}' in the HF state dict")
        out[key] = slots[0] if len(slots) == 1 else torch.cat(slots, dim=0)
    if unknown:
        raise unknown_keys_error("HF", unknown)
    if "mask_token" not in out and "cls_token" in out:
        out["mask_token"] = out["cls_token"].new_zeros(1, out["cls_token"].shape[-1])
    return out


def hf_config_kwargs(backbone: nn.Module) -> dict[str, Any]:
    """Keyword arguments for ``transformers.Dinov2Config`` (no registers) or
    ``Dinov2WithRegistersConfig`` (``num_register_tokens`` is present exactly when the backbone has
    registers) that reproduce ``backbone``.

    HF derives the FFN width from ``mlp_ratio`` as ``int(D * r)`` (MLP) or, for SwiGLU,
    ``round_up_8(int(int(D * r) * 2 / 3))``; transformers 5.x also requires an integer ``r``. An
    integer ratio reproducing our width is used whenever one exists (always for ratio-4 models),
    otherwise a float one (accepted by transformers 4.x only)."""
    arch = describe(backbone)
    dim, hidden = arch.embed_dim, arch.ffn_hidden
    if arch.ffn_layer == "swiglu":

        def width(r: float) -> int:
            return (int(int(dim * r) * 2 / 3) + 7) // 8 * 8

        guess = max(1, round(1.5 * hidden / dim))
        ints = [r for r in (guess, guess - 1, guess + 1) if r >= 1 and width(r) == hidden]
        ratio: float = ints[0] if ints else (1.5 * hidden + 0.5) / dim
        if width(ratio) != hidden:
            raise ValueError(f"no HF mlp_ratio reproduces a SwiGLU width of {hidden} for dim {dim}")
    else:
        ratio = hidden // dim if hidden % dim == 0 else (hidden + 0.5) / dim
    kwargs: dict[str, Any] = {
        "hidden_size": dim,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "mlp_ratio": ratio,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "image_size": arch.img_size,
        "patch_size": arch.patch_size,
        "num_channels": arch.in_chans,
        "qkv_bias": arch.qkv_bias,
        "layerscale_value": 1.0 if arch.layerscale_init is None else arch.layerscale_init,
        "use_swiglu_ffn": arch.ffn_layer == "swiglu",
        "drop_path_rate": 0.0,
    }
    if arch.num_register_tokens:
        kwargs["num_register_tokens"] = arch.num_register_tokens
    return kwargs
