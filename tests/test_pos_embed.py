"""Position-embedding interpolation modes (issue 13, item 6; ``dinov2.models.pos_embed``).

The released DINOv2 weights (learned on a 37 × 37 grid at 518 px) interpolate with dinov2's
``interpolate_pos_encoding`` (``dinov2/models/vision_transformer.py:180-212``: bicubic,
``scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M)``, no antialias). Weights saved in timm's and HF's
layouts, loaded through ``dinov2.interop``, must give the features of that formula at every input
size; ``reference_interpolation`` below re-states it line by line from the reference source. Each
other named mode equals its library's own function (called when the library is installed).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dinov2.config import ModelConfig, PosEmbedInterpolation
from dinov2.distributed.env import DistEnv
from dinov2.interop import (
    default_pos_embed_interpolation,
    export_state_dict,
    hf_config_kwargs,
    load_pretrained_backbone,
)
from dinov2.models import DinoVisionTransformer
from dinov2.models.pos_embed import interpolate_pos_embed
from dinov2.train.export import export_backbone

PATCH = 14
NATIVE = 518  # the released models' grid: 37 × 37
SIZES = (224, 98, 140, 518)  # 16, 7, 10 and 37 patches a side


def reference_interpolation(pos_embed, x_shape, patch_size, offset=0.1, antialias=False):
    """dinov2 ``vision_transformer.py:180-212`` for an image batch of shape ``x_shape`` (B, C, w, h) —
    the reference's names: its ``w`` is dim 2."""
    _, _, w, h = x_shape
    previous_dtype = pos_embed.dtype
    n = pos_embed.shape[1] - 1
    npatch = (w // patch_size) * (h // patch_size)
    if npatch == n and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    m = int(math.sqrt(n))
    kwargs = {}
    if offset:
        kwargs["scale_factor"] = (float(w0 + offset) / m, float(h0 + offset) / m)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def tiny(registers: int = 0, img_size: int = NATIVE, **kwargs) -> DinoVisionTransformer:
    model = DinoVisionTransformer(
        img_size=img_size, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2,
        num_register_tokens=registers, attn_backend="math", **kwargs,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "mask_token":
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if name == "pos_embed" else 0.1))
    return model.eval()


def images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))


@torch.no_grad()
def features(model: DinoVisionTransformer, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return torch.cat([out["cls"][:, None], out["registers"], out["patch"]], dim=1)


@torch.no_grad()
def reference_features(model: DinoVisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The features of ``model``'s weights with the reference formula: a model built on the input's own
    grid, holding the reference-interpolated position embedding, so nothing is interpolated in it."""
    size = x.shape[-1]
    native = DinoVisionTransformer(
        img_size=size, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2,
        num_register_tokens=model.num_register_tokens, attn_backend="math",
    ).eval()  # fmt: skip
    state = dict(model.state_dict())
    state["pos_embed"] = reference_interpolation(model.pos_embed, x.shape, PATCH)
    native.load_state_dict(state, strict=True)
    return features(native, x)


@pytest.mark.parametrize("layout", ["hf", "timm"])
def test_weights_saved_by_hf_and_timm_give_the_reference_features(tmp_path, layout):
    model = tiny()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in export_state_dict(model, layout).items()}, str(path))
    loaded = load_pretrained_backbone(path, model_cfg=ModelConfig(num_heads=2, attn_backend="math")).eval()
    assert loaded.pos_embed_interpolation == "reference"
    ours = tiny(pos_embed_interpolation="ours")
    for size in SIZES:
        x = images(size)
        expected = reference_features(model, x)
        diff = (features(loaded, x) - expected).abs().max().item()
        old = (features(ours, x) - expected).abs().max().item()
        print(f"{layout} {size}px: loaded vs reference {diff:.1e}; 'ours' vs reference {old:.1e}")
        assert diff <= 1e-6
        if size != NATIVE:
            assert old > 1e-3  # the sizes really interpolate, and differently


def test_reference_mode_is_the_reference_formula_on_non_square_grids():
    pos = tiny().pos_embed.detach()
    for h, w in ((16, 16), (7, 10), (37, 20), (40, 40)):
        ours = interpolate_pos_embed(pos, h, w, "reference")
        ref = reference_interpolation(pos, (1, 3, h * PATCH, w * PATCH), PATCH)
        assert torch.equal(ours, ref), (h, w)
    assert interpolate_pos_embed(pos, 37, 37, "reference") is pos


def test_reference_reg_is_the_released_register_models_formula():
    pos = tiny(registers=4).pos_embed.detach()
    for h, w in ((16, 16), (7, 10)):
        ref = reference_interpolation(pos, (1, 3, h * PATCH, w * PATCH), PATCH, offset=0.0, antialias=True)
        assert torch.equal(interpolate_pos_embed(pos, h, w, "reference_reg"), ref)


def test_hf_mode_is_transformers_interpolation():
    transformers = pytest.importorskip("transformers")
    model = tiny()
    hf = transformers.Dinov2Model(transformers.Dinov2Config(**hf_config_kwargs(model))).eval()
    with torch.no_grad():
        hf.embeddings.position_embeddings.copy_(model.pos_embed)
        for h, w in ((16, 16), (7, 10), (40, 40)):
            tokens = torch.zeros(1, 1 + h * w, 32)
            expected = hf.embeddings.interpolate_pos_encoding(tokens, h * PATCH, w * PATCH)
            assert torch.equal(interpolate_pos_embed(model.pos_embed, h, w, "hf"), expected), (h, w)
    # HF's with-registers model antialiases, as the released *_reg models: reference_reg
    with_regs = tiny(registers=4)
    config = transformers.Dinov2WithRegistersConfig(**hf_config_kwargs(with_regs))
    hf_regs = transformers.Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():
        hf_regs.embeddings.position_embeddings.copy_(with_regs.pos_embed)
        for h, w in ((16, 16), (7, 10)):
            expected = hf_regs.embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + h * w, 32), h * PATCH, w * PATCH)
            assert torch.equal(interpolate_pos_embed(with_regs.pos_embed, h, w, "reference_reg"), expected), (h, w)


def test_timm_mode_is_timm_resampling():
    timm = pytest.importorskip("timm")
    pos = tiny().pos_embed.detach()
    for h, w in ((16, 16), (7, 10), (40, 40)):
        expected = timm.layers.resample_abs_pos_embed(pos, new_size=[h, w], num_prefix_tokens=1)
        assert torch.equal(interpolate_pos_embed(pos, h, w, "timm"), expected), (h, w)
        assert torch.equal(interpolate_pos_embed(pos, h, w, "ours"), expected)  # the same numbers today


def test_default_mode_of_loaded_weights(tmp_path):
    model = tiny(registers=4, img_size=56)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    assert default_pos_embed_interpolation(plain, 4) == "reference_reg"
    torch.save(model.state_dict(), tmp_path / "released.pth")
    assert default_pos_embed_interpolation(tmp_path / "released.pth", 0) == "reference"
    model.pos_embed_interpolation = "hf"
    exported = export_backbone(model, tmp_path / "ours.safetensors", DistEnv())
    loaded = load_pretrained_backbone(exported, model_cfg=ModelConfig(num_heads=2))
    assert loaded.pos_embed_interpolation == "hf"  # our export records the mode it was trained with
    cfg = ModelConfig(num_heads=2, pos_embed_interpolation=PosEmbedInterpolation.timm)
    assert load_pretrained_backbone(plain, model_cfg=cfg).pos_embed_interpolation == "timm"  # the config wins
