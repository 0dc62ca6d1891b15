"""Copy-detection descriptors in the embed stage: a TorchScript model (SSCD's format), GeM pooling,
multi-scale, PCA-whitening fitted on the pool — each checked against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_curation import embeddings as emb_io
from data_curation.cli import main
from data_curation.descriptor import DescriptorModel, gem
from data_curation.whitening import Whitening, fit_whitening
from dinov2.config import Config, ModelConfig
from dinov2.eval import save_backbone
from dinov2.models import build_backbone

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class TinyDescriptor(torch.nn.Module):
    """A scripted copy-detection model as SSCD ships one: normalised images -> GeM -> linear -> L2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)
        return torch.nn.functional.normalize(self.proj(y), dim=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("descriptor_images")
    rng = np.random.default_rng(0)
    for i in range(12):
        size = (40 + 3 * i, 30 + 2 * i)  # not square: squash and centre crop differ
        Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def test_torchscript_model_embeds_like_its_direct_forward(folder, tmp_path):
    """``embed.model.kind=torchscript`` with its own preprocessing keys (squash to 32 px, ImageNet
    normalisation) gives the scripted model's own output on the preprocessed images."""
    torch.manual_seed(0)
    module = TinyDescriptor().eval()
    path = tmp_path / "descriptor.torchscript.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    argv = ["embed", "--workdir", str(tmp_path), "progress=false", f"embed.input.path={folder}"]
    argv += ["embed.model.kind=torchscript", f"embed.model.path={path}", "embed.model.img_size=32"]
    argv += ["embed.model.resize_mode=squash", "embed.dtype=float32", "embed.batch_size=5"]
    assert main(argv) == 0
    x, paths = emb_io.load_embeddings(tmp_path / "embeddings")

    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((32, 32), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        expected = module(batch).numpy()
    np.testing.assert_allclose(x, expected, atol=1e-5)
    # a file that is not TorchScript, and gem pooling (needs patch tokens), are one-line errors
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    assert main([*argv[:-3], "embed.model.path=" + str(tmp_path / "bad.pt"), "embeddings=bad"]) == 2
    assert main([*argv, "embed.pooling=gem", "embeddings=gem"]) == 2


def test_gem_pooling_and_multi_scale_match_a_direct_computation():
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 3)
    p = 3.0
    expected = (tokens.clamp(min=1e-6) ** p).mean(dim=1) ** (1 / p)
    torch.testing.assert_close(gem(tokens, p), expected)
    assert torch.allclose(gem(tokens.abs() + 0.1, 1.0), (tokens.abs() + 0.1).mean(dim=1))

    cfg = ModelConfig(arch="vit_small", embed_dim=32, depth=1, num_heads=2, patch_size=4, img_size=16)
    backbone = build_backbone(cfg).eval()
    images = torch.randn(3, 3, 16, 16)
    model = DescriptorModel(backbone, pooling="gem", gem_p=2.0, scales=(1.0, 0.5), patch_size=4)
    with torch.no_grad():
        got = model(images)["cls"]
        full = gem(backbone(images)["patch"], 2.0)
        small_images = torch.nn.functional.interpolate(images, size=(8, 8), mode="bicubic", antialias=True)
        small = gem(backbone(small_images)["patch"], 2.0)
    norm = torch.nn.functional.normalize
    torch.testing.assert_close(got, (norm(full, dim=-1) + norm(small, dim=-1)) / 2)


def test_whitening_decorrelates_and_the_embed_stage_applies_it_to_every_row(folder, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, 6)) @ rng.normal(size=(6, 6)) + 3.0
    w = fit_whitening(x, dim=4)
    y = (x - w.mean) @ w.projection
    # decorrelated, each axis at variance λ / (λ + ε) with ε = 1e-4 λ_max (the regularisation)
    lam = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1][:4]
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.diag(lam / (lam + 1e-4 * lam[0])), atol=1e-9)
    w.save(tmp_path / "w.npz")
    again = Whitening.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(again.projection, w.projection)

    # embed.whiten: raw shards under embeddings/raw, whitened rows = the saved whitening of the raw rows
    cfg = Config()
    cfg.model = ModelConfig(arch="vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16)
    cfg.data.crops.global_crops_size = 16
    torch.manual_seed(0)
    save_backbone(build_backbone(cfg.model), cfg, tmp_path / "run", "teacher_backbone.safetensors")
    argv = ["embed", "--workdir", str(tmp_path), "progress=false", f"embed.input.path={folder}"]
    argv += [f"embed.model.path={tmp_path / 'run'}", "embed.whiten=true", "embed.whiten_dim=8", "embed.shard_size=5"]
    assert main([*argv, "embed.dtype=float32"]) == 0
    raw, raw_paths = emb_io.load_embeddings(tmp_path / "embeddings" / "raw")
    white, paths = emb_io.load_embeddings(tmp_path / "embeddings")
    assert raw.shape == (12, 32) and white.shape == (12, 8) and raw_paths == paths
    whitening = Whitening.load(tmp_path / "embeddings" / "whitening.npz")
    np.testing.assert_allclose(white, whitening.apply(raw), atol=1e-6)
    assert emb_io.read_meta(tmp_path / "embeddings")["whitening"] == "whitening.npz"
