"""Attention maps: CLS→patch rows of the last block, the top-mass mask, and the PNG overlay grid."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.eval import attention_maps, save_attention_overlays, top_mass_mask
from dinov2.models import create_vit

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_vit():
    torch.manual_seed(0)
    return create_vit(
        "vit_small", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_register_tokens=2
    )


def test_attention_maps_are_the_cls_row_over_patches():
    model = tiny_vit().train()
    images = torch.randn(3, 3, 32, 32)
    maps = attention_maps(model, images)
    assert model.training  # restored
    assert maps.shape == (3, 2, 8, 8) and maps.dtype == torch.float32
    with torch.no_grad():
        full = model.eval().last_self_attention(images)  # (B, H, 1 + 2 + 64, same)
    torch.testing.assert_close(maps.flatten(2), full[:, :, 0, 3:])
    sums = maps.sum(dim=(-2, -1))
    assert (maps >= 0).all() and (sums <= 1 + 1e-5).all() and (sums > 0.5).all()
    # sizes not divisible by the patch are cropped to the patch grid
    assert attention_maps(model, torch.randn(1, 3, 35, 30)).shape == (1, 2, 8, 7)


def test_top_mass_mask_keeps_the_fewest_patches_reaching_the_mass():
    maps = torch.tensor([[0.1, 0.5], [0.1, 0.3]]).reshape(1, 1, 2, 2)
    # sorted: .5 (mass before 0), .3 (before .5), .1 (before .8): 60 % is reached with .5 and .3
    assert top_mass_mask(maps, 0.6).flatten().tolist() == [False, True, False, True]
    assert top_mass_mask(maps, 0.5).flatten().tolist() == [False, True, False, False]
    assert top_mass_mask(maps, 1.0).all()
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    kept = attention_maps(model, images, top_mass=0.6)
    raw = attention_maps(model, images)
    frac = kept.sum(dim=(-2, -1)) / raw.sum(dim=(-2, -1))
    assert (frac >= 0.6 - 1e-5).all() and (kept <= raw).all() and (kept == 0).any()
    with pytest.raises(ValueError):
        top_mass_mask(maps, 0.0)


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_overlay_png(tmp_path, monkeypatch, with_matplotlib):
    if not with_matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: the built-in colormap is used
    model = tiny_vit()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    pixels[:, 8:24, 8:24] = 255  # a bright square "object"
    images = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(
        STD
    )[:, None, None]
    maps = attention_maps(model, images)
    path = save_attention_overlays(images, maps, tmp_path / "sub" / "attn.png", MEAN, STD, panel_size=64, gap=2)
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as png:
        assert png.size == (4 * 64 + 3 * 2, 4 * 64 + 3 * 2)  # columns: image, 2 heads, mean; rows: 4 images
        grid = np.asarray(png.convert("RGB"))
    # the first column is the un-normalized image, enlarged 2x
    np.testing.assert_allclose(grid[:64:2, :64:2].astype(int), pixels[0].astype(int), atol=1)
    assert grid[:64, 66:130].std() > 10  # an overlay panel is not blank
    # uint8 input (channels last) gives the same picture
    again = save_attention_overlays(pixels, maps, tmp_path / "again.png", panel_size=64, gap=2)
    with Image.open(again) as png2:
        assert np.abs(np.asarray(png2.convert("RGB")).astype(int) - grid.astype(int)).max() <= 1
