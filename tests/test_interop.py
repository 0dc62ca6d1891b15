"""Interop with timm's ``vit_*_patch14_dinov2`` and HF transformers' ``Dinov2Model`` layouts.

Our random tiny ViTs are exported, loaded strictly into timm / transformers models built with random
weights (no downloads), compared feature by feature (CLS, registers, patches after the final norm;
fp32, max abs diff ≤ 1e-5 at the native input size) and converted back. The diff at another input
size is printed only: HF's ``Dinov2Model`` interpolates position embeddings without antialiasing.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dinov2.config import ModelConfig
from dinov2.interop import (
    detect_layout,
    export_state_dict,
    from_hf,
    from_timm,
    hf_config_kwargs,
    load_pretrained_backbone,
    load_state_dict_any,
    timm_model_kwargs,
    to_hf,
    to_timm,
)
from dinov2.models import DinoVisionTransformer

NATIVE, OTHER = 56, 70  # 4×4 and 5×5 patch grids at patch 14
TOL = 1e-5
CASES = [("mlp", 0), ("swiglu", 0), ("mlp", 4), ("swiglu", 4)]


def tiny(ffn: str = "mlp", registers: int = 0, embed_dim: int = 64, depth: int = 2, heads: int = 4):
    """A tiny backbone with every parameter random (LayerScale and norms included) except the mask
    token, which stays zero (timm has none)."""
    model = DinoVisionTransformer(
        img_size=NATIVE,
        patch_size=14,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        ffn_layer=ffn,
        num_register_tokens=registers,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "mask_token":
                continue
            noise = torch.randn(p.shape, generator=gen)
            is_norm_weight = name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight"
            p.copy_(1.0 + 0.2 * noise if is_norm_weight else noise * (0.1 if p.ndim > 1 else 0.3))
    return model.eval()


def images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))


@torch.no_grad()
def our_tokens(model: DinoVisionTransformer, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return torch.cat([out["cls"][:, None], out["registers"], out["patch"]], dim=1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_same_state(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        if key not in skip:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------- general
def test_import_pulls_neither_timm_nor_transformers():
    code = "import sys, dinov2.interop; assert not {'timm', 'transformers'} & set(sys.modules), 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_detect_layout():
    state = tiny("swiglu", 4, depth=1).state_dict()
    assert detect_layout(state) == "ours"
    assert detect_layout(to_timm(state)) == "timm"
    assert detect_layout(to_hf(state)) == "hf"
    assert detect_layout({f"dinov2.{k}": v for k, v in to_hf(state, naming="modules").items()}) == "hf"
    with pytest.raises(ValueError, match="layout"):
        detect_layout({"foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="layout"):
        export_state_dict(state, "onnx")


def test_chunked_original_checkpoint_keys():
    """facebookresearch/dinov2's BlockChunk keys (blocks.{chunk}.{i}.…) load as ours."""
    state = tiny(depth=2).state_dict()
    chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", k): v for k, v in state.items()}  # one chunk
    assert "blocks.0.1.norm1.weight" in chunked
    assert_same_state(load_state_dict_any(chunked), state)


# ------------------------------------------------------------------------------------------- timm
def timm_model(model: DinoVisionTransformer, **kwargs):
    timm = pytest.importorskip("timm")
    name = f"vit_small_patch14{'_reg4' if model.num_register_tokens else ''}_dinov2"
    return timm.create_model(name, pretrained=False, **timm_model_kwargs(model, **kwargs)).eval()


@pytest.mark.parametrize("ffn,registers", CASES)
def test_timm_export_features_and_back(ffn, registers):
    model = tiny(ffn, registers)
    state = model.state_dict()
    exported = export_state_dict(model, "timm")
    assert "mask_token" not in exported and ("reg_token" in exported) == bool(registers)
    timm_vit = timm_model(model)
    timm_vit.load_state_dict(exported, strict=True)
    with torch.no_grad():
        native = max_diff(timm_vit.forward_features(images(NATIVE)), our_tokens(model, images(NATIVE)))
        other = max_diff(timm_vit.forward_features(images(OTHER)), our_tokens(model, images(OTHER)))
    print(f"timm {ffn} reg={registers}: max abs diff {native:.2e} at {NATIVE}px, {other:.2e} at {OTHER}px")
    assert native <= TOL

    back = from_timm(timm_vit.state_dict())
    if registers:  # timm's no_embed_class layout folds the class position into the class token
        assert_same_state(back, state, skip=("cls_token", "pos_embed"))
        assert torch.equal(back["cls_token"], state["cls_token"] + state["pos_embed"][:, :1])
        assert torch.equal(back["pos_embed"][:, 1:], state["pos_embed"][:, 1:])
        assert not back["pos_embed"][:, 0].any()
        assert_same_state(to_timm(back), exported)  # and timm → ours → timm is exact
    else:
        assert_same_state(back, state)


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_timm_registers_with_class_position_round_trips_exactly(ffn):
    model = tiny(ffn, 4)
    state = model.state_dict()
    exported = to_timm(state, no_embed_class=False)
    assert exported["pos_embed"].shape[1] == 1 + 4 + 16
    timm_vit = timm_model(model, no_embed_class=False)
    timm_vit.load_state_dict(exported, strict=True)
    with torch.no_grad():
        assert max_diff(timm_vit.forward_features(images(NATIVE)), our_tokens(model, images(NATIVE))) <= TOL
    assert_same_state(from_timm(timm_vit.state_dict()), state)


def test_timm_split_swiglu_imports():
    """timm's unpacked SwiGLU (fc1_g gate, fc1_x value) maps onto our fused w12."""
    timm = pytest.importorskip("timm")
    model = tiny("swiglu", 0)
    hidden = model.blocks[0].mlp.w3.in_features
    kwargs = timm_model_kwargs(model) | {"mlp_layer": timm.layers.SwiGLU, "mlp_ratio": hidden / 64}
    timm_vit = timm.models.vision_transformer.VisionTransformer(**kwargs).eval()
    packed = to_timm(model.state_dict())
    split = {}
    for key, value in packed.items():
        if ".mlp.fc1." in key:
            gate, val = value.chunk(2)
            split[key.replace("fc1", "fc1_g")], split[key.replace("fc1", "fc1_x")] = gate.clone(), val.clone()
        else:
            split[key] = value
    timm_vit.load_state_dict(split, strict=True)
    with torch.no_grad():
        assert max_diff(timm_vit.forward_features(images(NATIVE)), our_tokens(model, images(NATIVE))) <= TOL
    assert_same_state(from_timm(split), model.state_dict())


# --------------------------------------------------------------------------------------------- HF
def hf_model(model: DinoVisionTransformer):
    transformers = pytest.importorskip("transformers")
    kwargs = hf_config_kwargs(model)
    if "num_register_tokens" in kwargs:
        config = transformers.Dinov2WithRegistersConfig(**kwargs)
        return transformers.Dinov2WithRegistersModel(config).eval()
    return transformers.Dinov2Model(transformers.Dinov2Config(**kwargs)).eval()


def module_naming(hf) -> str:
    """transformers 5.x modules are named q_proj / o_proj / gate_proj …, 4.x ones like the Hub files."""
    return "modules" if "encoder.layer.0.attention.q_proj.weight" in hf.state_dict() else "hub"


@pytest.mark.parametrize("ffn,registers", CASES)
def test_hf_export_features_and_back(ffn, registers):
    model = tiny(ffn, registers)
    state = model.state_dict()
    hf = hf_model(model)
    naming = module_naming(hf)
    hf.load_state_dict(export_state_dict(model, "hf", naming=naming), strict=True)
    with torch.no_grad():
        native = max_diff(hf(pixel_values=images(NATIVE)).last_hidden_state, our_tokens(model, images(NATIVE)))
        other = max_diff(hf(pixel_values=images(OTHER)).last_hidden_state, our_tokens(model, images(OTHER)))
    print(f"HF {ffn} reg={registers}: max abs diff {native:.2e} at {NATIVE}px, {other:.2e} at {OTHER}px")
    assert native <= TOL

    assert_same_state(from_hf(hf.state_dict()), state)
    for other_naming in ("hub", "modules"):
        assert_same_state(from_hf(to_hf(state, naming=other_naming)), state)


def test_hf_hub_named_folder_loads_with_from_pretrained(tmp_path):
    """A Hub-named safetensors + config.json folder loads through transformers' own from_pretrained
    (which renames / splits weights_in on 5.x) and through load_pretrained_backbone."""
    model = tiny("swiglu", 4)
    hf = hf_model(model)  # random init, only for its class and config
    hf.config.save_pretrained(tmp_path)
    save_file(export_state_dict(model, "hf", naming="hub"), str(tmp_path / "model.safetensors"), {"format": "pt"})
    loaded = type(hf).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(loaded(pixel_values=images(NATIVE)).last_hidden_state, our_tokens(model, images(NATIVE))) <= TOL
    ours = load_pretrained_backbone(tmp_path)  # heads from config.json
    assert ours.blocks[0].attn.num_heads == 4
    assert_same_state(ours.state_dict(), model.state_dict())


def test_hf_config_reproduces_ffn_widths():
    for ffn in ("mlp", "swiglu"):
        for dim in (64, 384, 1536):
            kwargs = hf_config_kwargs(tiny(ffn, embed_dim=dim, depth=1, heads=dim // 64))
            assert kwargs["mlp_ratio"] == 4 and isinstance(kwargs["mlp_ratio"], int)


# ----------------------------------------------------------------------------- pretrained loading
@pytest.mark.parametrize("layout", ["ours", "timm", "hf-hub", "hf-modules"])
@pytest.mark.parametrize("ffn,registers", [("mlp", 4), ("swiglu", 0)])
def test_load_pretrained_backbone_from_safetensors(tmp_path, layout, ffn, registers):
    model = tiny(ffn, registers)
    kind, _, naming = layout.partition("-")
    exported = export_state_dict(model, kind, **({"naming": naming} if naming else {}))
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in exported.items()}, str(path))
    cfg = ModelConfig(arch="vit_small", num_heads=4, attn_backend="math")
    loaded = load_pretrained_backbone(path, model_cfg=cfg).eval()
    assert loaded.num_register_tokens == registers and loaded.dispatcher.name == "math"
    if kind == "timm" and registers:
        assert_same_state(loaded.state_dict(), model.state_dict(), skip=("cls_token", "pos_embed"))
    else:
        assert_same_state(loaded.state_dict(), model.state_dict())
    # weights without our export's record interpolate as released (tests/test_pos_embed.py)
    assert loaded.pos_embed_interpolation == ("reference_reg" if registers else "reference")
    model.pos_embed_interpolation = loaded.pos_embed_interpolation
    for size in (NATIVE, OTHER):  # our own model on both sides: any size agrees
        assert max_diff(our_tokens(loaded, images(size)), our_tokens(model, images(size))) <= TOL


def test_load_pretrained_backbone_torch_checkpoint_and_defaults(tmp_path):
    model = tiny("mlp", 0, embed_dim=384, depth=1, heads=6)
    wrapped = {"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}, "iteration": torch.tensor(3)}
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(wrapped, path)
    loaded = load_pretrained_backbone(path, prefix="backbone.")  # heads by width: 384 → 6
    assert loaded.blocks[0].attn.num_heads == 6 and len(loaded.blocks) == 1
    assert_same_state(loaded.state_dict(), model.state_dict())
    with pytest.raises(ValueError, match="embed_dim"):
        load_pretrained_backbone(path, model_cfg=ModelConfig(embed_dim=768), prefix="backbone.")

    odd = tmp_path / "odd.safetensors"
    save_file(tiny(embed_dim=64, depth=1).state_dict(), str(odd))
    with pytest.raises(ValueError, match="heads"):
        load_pretrained_backbone(odd)
    assert load_pretrained_backbone(odd, num_heads=2).blocks[0].attn.num_heads == 2
