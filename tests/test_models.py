"""ViT family: parameter counts, packed == unpacked, position embeddings, mask token, import cost."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from dinov2.models import create_vit, vit_base, vit_giant2, vit_large, vit_small


@pytest.mark.parametrize(
    "factory, expected_m",
    [(vit_small, 22), (vit_base, 86), (vit_large, 304), (vit_giant2, 1135)],
)
def test_param_counts_on_meta(factory, expected_m):
    with torch.device("meta"):
        model = factory(patch_size=14, img_size=224)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - expected_m) / expected_m < 0.02, n


def test_giant_uses_swiglu_4096():
    with torch.device("meta"):
        model = vit_giant2()
    assert model.blocks[0].mlp.w12.out_features == 2 * 4096
    assert len(model.blocks) == 40 and model.embed_dim == 1536


def tiny_vit(**kw):
    base = dict(
        img_size=32,
        patch_size=4,
        embed_dim=48,
        depth=3,
        num_heads=4,
        num_register_tokens=2,
        layerscale_init=0.5,
    )
    base.update(kw)
    return create_vit("vit_small", **base)


@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglu"])
def test_packed_forward_equals_per_sample_reference(ffn_layer):
    """Packed groups through the default (SDPA) attention == every sample alone through the explicit
    softmax(QKᵀ/√d)V backend: forward and gradients. Per-sample calls rule out any mixing between the
    samples of a group or between groups; the other attention path rules out a shared bug."""
    torch.manual_seed(0)
    model = tiny_vit(ffn_layer=ffn_layer, attn_backend="sdpa").eval()
    reference = tiny_vit(ffn_layer=ffn_layer, attn_backend="math").eval()
    reference.load_state_dict(model.state_dict())
    g = torch.randn(4, 3, 32, 32)
    loc = torch.randn(6, 3, 16, 16)
    mask = torch.rand(4, 64) < 0.4

    def loss_of(outs):
        # order-1 loss so that fp32 rounding of the gradients stays far below the 1e-5 tolerance
        return sum((o["cls"] ** 2).mean() + o["patch"].sin().mean() + o["registers"].mean() for o in outs)

    def one_by_one(x, m):
        outs = [reference(x[i : i + 1], None if m is None else m[i : i + 1]) for i in range(len(x))]
        return {key: torch.cat([o[key] for o in outs]) for key in ("cls", "registers", "patch")}

    packed = model([g, loc], [mask, None])
    loss_of(packed).backward()
    separate = [one_by_one(g, mask), one_by_one(loc, None)]
    loss_of(separate).backward()
    grads = dict(reference.named_parameters())
    for a, b in zip(packed, separate, strict=True):
        for key in ("cls", "registers", "patch"):
            assert (a[key] - b[key]).abs().max() <= 1e-5
    for n, p in model.named_parameters():
        assert (p.grad - grads[n].grad).abs().max() <= 1e-5, n
    assert model.mask_token.grad.abs().sum() > 0  # masks really used


def test_pos_embed_interpolation():
    torch.manual_seed(0)
    model = tiny_vit()
    assert model.interpolate_pos_encoding(8, 8) is model.pos_embed
    pos = model.interpolate_pos_encoding(4, 6)
    grid = model.pos_embed[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(4, 6), mode="bicubic", antialias=True, align_corners=False)
    assert pos.shape == (1, 1 + 24, 48)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])
    assert torch.allclose(pos[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 24, -1))
    out = model(torch.randn(2, 3, 16, 24))  # non-square input
    assert out["patch"].shape == (2, 24, 48)


def test_mask_token_replaces_masked_patches():
    torch.manual_seed(0)
    model = tiny_vit(num_register_tokens=0)
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, 5] = True
    tokens = model.prepare_tokens(x, mask)
    pos = model.pos_embed[0, 1:]
    assert torch.allclose(tokens[0, 1 + 5], model.mask_token[0] + pos[5])
    plain = model.prepare_tokens(x)
    assert torch.equal(tokens[1], plain[1]) and torch.equal(tokens[0, 1 + 6 :], plain[0, 1 + 6 :])
    assert not torch.allclose(tokens[0, 1 + 5], plain[0, 1 + 5])


def test_registers_are_placed_after_cls():
    model = tiny_vit(num_register_tokens=3)
    tokens = model.prepare_tokens(torch.randn(1, 3, 32, 32))
    assert tokens.shape == (1, 1 + 3 + 64, 48)
    assert torch.equal(tokens[0, 1:4], model.register_tokens[0])


def test_last_self_attention_is_a_distribution():
    model = tiny_vit().eval()
    attn = model.last_self_attention(torch.randn(2, 3, 32, 32))
    assert attn.shape == (2, 4, 1 + 2 + 64, 1 + 2 + 64)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 67))


def test_import_is_light_and_lazy():
    code = (
        "import sys, time; t = time.time(); import dinov2, dinov2.models, dinov2.layers, dinov2.config; "
        "heavy = [m for m in ('torchvision', 'faiss', 'submitit', 'xformers', 'fvcore', 'timm', 'matplotlib', "
        "'transformers', 'PIL') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    bare = subprocess.run(
        [sys.executable, "-c", "import sys, dinov2; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert bare.stdout.strip() == "False"  # the top-level package itself imports nothing


@pytest.mark.gpu
def test_bf16_packed_vs_unpacked_vit_large_gpu():
    torch.manual_seed(0)
    model = vit_large(patch_size=14, img_size=224).cuda().eval()
    g = torch.randn(2, 3, 224, 224, device="cuda")
    loc = torch.randn(8, 3, 98, 98, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        packed = model([g, loc])
        separate = [model(g), model(loc)]
    for a, b in zip(packed, separate, strict=True):
        for key in ("cls", "patch"):
            err = (a[key].float() - b[key].float()).norm() / b[key].float().norm()
            assert err < 2e-2, (key, err)


def test_the_reference_import_idiom_binds_the_module():
    """``import dinov2.models.vision_transformer as vits`` (the reference's idiom) gives the module,
    not a function of the same name that shadows it."""
    import dinov2.models.vision_transformer as vits

    assert isinstance(vits, types.ModuleType)
    assert vits.vit_small is vit_small


def test_model_config_resolves_the_arch_defaults_once_and_from_config_builds_it():
    """``ModelConfig.resolved()`` fills what the arch name stands for and keeps what the config sets;
    ``DinoVisionTransformer.from_config`` builds exactly that (the FLOP formulas read the same copy)."""
    from dinov2.config import ModelConfig
    from dinov2.models import DinoVisionTransformer

    giant = ModelConfig(arch="vit_giant2").resolved()
    assert (giant.embed_dim, giant.depth, giant.num_heads, giant.ffn_layer) == (1536, 40, 24, "swiglu")
    custom = ModelConfig(arch="vit_giant2", embed_dim=48, depth=3, num_heads=3, ffn_layer="mlp", patch_size=4)
    assert custom.resolved() == custom and ModelConfig().embed_dim is None  # a copy: the original keeps None
    model = DinoVisionTransformer.from_config(
        dataclasses.replace(custom, img_size=16, num_register_tokens=2, layerscale_init=None)
    )
    assert len(model.blocks) == 3 and model.pos_embed.shape == (1, 1 + 16, 48)
    assert model.register_tokens.shape == (1, 2, 48) and model.blocks[0].attn.num_heads == 3
