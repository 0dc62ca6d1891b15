"""Batched multi-crop augmentation on the device (dinov2.data.gpu): shapes, the same
operations and parameters as the CPU path (checked against torchvision's functional ops), the per-view
probabilities, determinism, the batch layout the trainer consumes, and the device stream."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dinov2.config import CropsConfig, MaskConfig, load_config
from dinov2.data.augmentations import blur_kernel_size
from dinov2.data.collate import collate_multicrop
from dinov2.data.gpu import (
    GPUMultiCrop,
    GPUTrainLoader,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    batch_generator,
    build_gpu_train_loader,
    collate_gpu,
    crop_grid,
    decode_dataset,
    device_generator,
    gaussian_blur,
    grayscale,
    random_resized_crop_boxes,
    resample_crops,
    solarize,
    supersample_factor,
)
from dinov2.data.samplers import InfiniteSampler
from dinov2.data.seeding import STREAM_MASKS, numpy_rng

SMALL = CropsConfig(global_crops_size=8, local_crops_size=4, local_crops_number=3)
BATCH_KEYS = {
    "global_crops", "local_crops", "masks", "mask_indices", "n_masked_patches", "mask_weights",
    "labels", "positions", "num_skipped", "skipped_paths",
}  # fmt: skip


def images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def identity_cfg(**changes) -> CropsConfig:
    """Full-image global crops at the image size, no flip, every colour op off, identity normalisation."""
    base = CropsConfig(
        global_crops_size=8, local_crops_size=4, local_crops_number=1, global_crops_scale=[1.0, 1.0],
        hflip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p_global1=0.0, blur_p_global2=0.0,
        blur_p_local=0.0, solarize_p_global2=0.0, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0],
    )  # fmt: skip
    return replace(base, **changes)


# ------------------------------------------------------------------------------------- shapes
def test_shapes_dtypes_ranges_and_layouts():
    batch = images(5)
    aug = GPUMultiCrop(SMALL)
    out = aug(batch, device_generator("cpu", 0))
    assert out["global_crops"].shape == (10, 3, 8, 8) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape == (15, 3, 4, 4)
    mean, std = torch.tensor(SMALL.mean).view(1, 3, 1, 1), torch.tensor(SMALL.std).view(1, 3, 1, 1)
    for crops in (out["global_crops"], out["local_crops"]):
        assert torch.isfinite(crops).all()
        assert (crops >= (0 - mean) / std - 1e-5).all() and (crops <= (1 - mean) / std + 1e-5).all()
    nchw = aug(batch.permute(0, 3, 1, 2).contiguous(), device_generator("cpu", 0))
    assert torch.equal(nchw["global_crops"], out["global_crops"]) and torch.equal(
        nchw["local_crops"], out["local_crops"]
    )
    half = GPUMultiCrop(SMALL, out_dtype=torch.bfloat16)(batch, device_generator("cpu", 0))
    assert half["global_crops"].dtype == torch.bfloat16
    none = GPUMultiCrop(replace(SMALL, local_crops_number=0))(batch, device_generator("cpu", 0))
    assert none["local_crops"].numel() == 0
    with pytest.raises(TypeError):
        aug(batch.float())
    with pytest.raises(ValueError):
        GPUMultiCrop(SMALL, interpolation="nearest")


def test_deterministic_given_the_seed():
    batch = images(4)
    aug = GPUMultiCrop(SMALL)
    a = aug(batch, device_generator("cpu", 7))
    b = aug(batch, device_generator("cpu", 7))
    c = aug(batch, device_generator("cpu", 8))
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_crops"], b["local_crops"])
    assert not torch.equal(a["global_crops"], c["global_crops"])
    assert torch.equal(
        aug(batch, batch_generator("cpu", 0, 128))["global_crops"],
        aug(batch, batch_generator("cpu", 0, 128))["global_crops"],
    )
    assert not torch.equal(
        aug(batch, batch_generator("cpu", 0, 128))["global_crops"],
        aug(batch, batch_generator("cpu", 0, 129))["global_crops"],
    )


# ---------------------------------------------------------------------- random resized crop
def test_crop_boxes_follow_torchvision_rule():
    n, height, width = 4000, 20, 30
    for scale in ([0.32, 1.0], [0.05, 0.32]):
        boxes = random_resized_crop_boxes(n, height, width, scale, generator=device_generator("cpu", 1))
        top, left, h, w = boxes.unbind(1)
        assert torch.equal(boxes, boxes.round())
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        area = h * w / (height * width)
        slack = (2 * max(height, width) + 1) / (height * width)  # rounding w and h by up to 0.5 each
        assert area.min() >= scale[0] - slack and area.max() <= scale[1] + slack
        torch.manual_seed(0)
        ref = torch.tensor(
            [RandomResizedCrop.get_params(torch.zeros(3, height, width), scale, (3 / 4, 4 / 3)) for _ in range(n)]
        )
        ref_area = (ref[:, 2] * ref[:, 3]).float() / (height * width)
        assert abs(area.mean() - ref_area.mean()) < 0.015
        assert abs(area.std() - ref_area.std()) < 0.015
        assert abs(torch.log(w / h).mean() - torch.log(ref[:, 3] / ref[:, 2]).float().mean()) < 0.03
        assert abs(top.mean() - ref[:, 0].float().mean()) < 0.5 and abs(left.mean() - ref[:, 1].float().mean()) < 0.5


def test_crop_box_fallback_is_torchvision_central_box():
    for height, width in ((10, 40), (40, 10), (12, 12)):
        expected = RandomResizedCrop.get_params(torch.zeros(3, height, width), (1.0, 1.0), (3 / 4, 4 / 3))
        boxes = random_resized_crop_boxes(50, height, width, (1.0, 1.0), generator=device_generator("cpu", 0))
        assert (boxes == torch.tensor(expected, dtype=torch.float32)).all(), (height, width)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resampling_is_interpolate_of_the_box(mode):
    """Inside the border the crop equals cut-then-resize (torchvision, no antialias) of the box, flips included."""
    img = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[2.0, 3.0, 10.0, 12.0], [0.0, 5.0, 20.0, 9.0], [3.0, 4.0, 15.0, 15.0]])
    flips = torch.tensor([False, True, True])
    crops = resample_crops(img, crop_grid(boxes, flips, 20, 24, 16, 1), 1, 16, 1, mode)
    margin = 1 if mode == "bilinear" else 3  # output pixels whose taps can leave the box
    interp = InterpolationMode.BILINEAR if mode == "bilinear" else InterpolationMode.BICUBIC
    for b in range(3):
        t, l, h, w = (int(v) for v in boxes[b])
        ref = TF.resized_crop(img[b], t, l, h, w, [16, 16], interpolation=interp, antialias=False).clamp(0, 1)
        ref = TF.horizontal_flip(ref) if flips[b] else ref
        inner = (slice(None), slice(margin, -margin), slice(margin, -margin))
        torch.testing.assert_close(crops[b][inner], ref[inner], atol=1e-5, rtol=0)
    full = resample_crops(
        img, crop_grid(torch.tensor([[0.0, 0.0, 20.0, 24.0]] * 3), flips, 20, 24, 20, 1), 1, 20, 1, mode
    )
    torch.testing.assert_close(full[0], TF.resize(img[0], [20, 20], interpolation=interp, antialias=False).clamp(0, 1))


def test_views_are_view_major_and_supersampling():
    img = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 8.0, 8.0], [8.0, 8.0, 8.0, 8.0], [0.0, 0.0, 16.0, 16.0]])
    no_flip = torch.zeros(4, dtype=torch.bool)
    # rows: view 0 of images 0 and 1, then view 1 of images 0 and 1
    crops = resample_crops(img, crop_grid(boxes, no_flip, 16, 16, 8, 2, 1), 2, 8, 1, "bilinear")
    torch.testing.assert_close(crops[1], img[1, :, :8, :8], atol=1e-6, rtol=0)
    torch.testing.assert_close(crops[2], img[0, :, 8:, 8:], atol=1e-6, rtol=0)
    # supersampled 2×2: a whole-image crop at half size is the 2×2 box average
    crops = resample_crops(img, crop_grid(boxes, no_flip, 16, 16, 8, 2, 2), 2, 8, 2, "bilinear")
    torch.testing.assert_close(crops[0], torch.nn.functional.avg_pool2d(img[0:1], 2)[0])
    torch.testing.assert_close(crops[3], torch.nn.functional.avg_pool2d(img[1:2], 2)[0])
    assert supersample_factor(32, 32, 32, [0.25, 1.0]) == 1
    assert supersample_factor(256, 256, 98, [0.05, 0.32]) == 2
    assert supersample_factor(1024, 1024, 98, [0.05, 0.32]) == 4


# ------------------------------------------------------------------------------ colour ops
def test_colour_ops_equal_torchvision_functional():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 9, 9, generator=gen)
    f = torch.rand(6, generator=gen) * 1.6
    shift = torch.rand(6, generator=gen) - 0.5
    sigma = 0.1 + 1.9 * torch.rand(6, generator=gen)
    ref = {
        "brightness": [TF.adjust_brightness(x[i], float(f[i])) for i in range(6)],
        "contrast": [TF.adjust_contrast(x[i], float(f[i])) for i in range(6)],
        "saturation": [TF.adjust_saturation(x[i], float(f[i])) for i in range(6)],
        "hue": [TF.adjust_hue(x[i], float(shift[i])) for i in range(6)],
        "blur": [TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2) for i in range(6)],
    }
    ours = {
        "brightness": adjust_brightness(x, f),
        "contrast": adjust_contrast(x, f),
        "saturation": adjust_saturation(x, f),
        "hue": adjust_hue(x, shift),
        "blur": gaussian_blur(x, sigma, 5),
    }
    for name, expected in ref.items():
        torch.testing.assert_close(ours[name], torch.stack(expected), atol=2e-6, rtol=0, msg=name)
    torch.testing.assert_close(grayscale(x).expand(-1, 3, -1, -1), TF.rgb_to_grayscale(x, 3))
    torch.testing.assert_close(solarize(x, 0.5), TF.solarize(x, 0.5))
    torch.testing.assert_close(adjust_hue(x, torch.zeros(6)), x, atol=1e-6, rtol=0)


def test_colour_jitter_applies_each_op_in_the_drawn_order():
    cfg = identity_cfg(color_jitter_p=1.0)
    batch = images(16, seed=3)
    out = GPUMultiCrop(cfg)(batch, device_generator("cpu", 5), return_params=True)
    p = out["params"]["global"]
    pixels = batch.permute(0, 3, 1, 2).float() / 255
    ops = {
        0: lambda t, i: TF.adjust_brightness(t, float(p["jitter_brightness"][i])),
        1: lambda t, i: TF.adjust_contrast(t, float(p["jitter_contrast"][i])),
        2: lambda t, i: TF.adjust_saturation(t, float(p["jitter_saturation"][i])),
        3: lambda t, i: TF.adjust_hue(t, float(p["jitter_hue"][i])),
    }
    assert p["jitter"].all() and not p["flip"].any()
    assert len({tuple(o.tolist()) for o in p["jitter_order"]}) > 5  # the orders differ between crops
    for i in range(32):
        expected = pixels[i % 16]
        for op in p["jitter_order"][i].tolist():
            expected = ops[op](expected, i)
        torch.testing.assert_close(out["global_crops"][i], expected, atol=1e-5, rtol=0)
    lo, hi = 1 - cfg.brightness, 1 + cfg.brightness
    assert (p["jitter_brightness"] >= lo).all() and (p["jitter_brightness"] <= hi).all()
    assert (p["jitter_hue"].abs() <= cfg.hue).all() and (p["jitter_saturation"] >= 1 - cfg.saturation).all()


def test_blur_solarize_grayscale_flip_are_applied_per_view():
    batch = images(12, seed=4)
    pixels = batch.permute(0, 3, 1, 2).float() / 255
    cfg = identity_cfg(blur_p_global1=1.0, solarize_p_global2=1.0, hflip_p=0.5)
    out = GPUMultiCrop(cfg)(batch, device_generator("cpu", 2), return_params=True)
    p = out["params"]["global"]
    first, second = out["global_crops"][:12], out["global_crops"][12:]
    flipped = [TF.horizontal_flip(pixels[i]) if p["flip"][i] else pixels[i] for i in range(12)]
    k = blur_kernel_size(8, max(cfg.blur_sigma))
    for i in range(12):
        torch.testing.assert_close(
            first[i], TF.gaussian_blur(flipped[i], [k, k], [float(p["sigma"][i])] * 2), atol=2e-6, rtol=0
        )
        j = i + 12
        expected = TF.horizontal_flip(pixels[i]) if p["flip"][j] else pixels[i]
        torch.testing.assert_close(second[i], TF.solarize(expected, 0.5))
    gray = GPUMultiCrop(identity_cfg(grayscale_p=1.0))(batch, device_generator("cpu", 0))["global_crops"]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_per_view_probabilities_match_the_cpu_recipe():
    """The rates of every random choice, per view, are the CPU path's (the default recipe)."""
    n = 2000
    cfg = CropsConfig(global_crops_size=4, local_crops_size=2, local_crops_number=4)
    out = GPUMultiCrop(cfg)(images(n, size=8), device_generator("cpu", 0), return_params=True)
    g, loc = out["params"]["global"], out["params"]["local"]
    view1, view2 = slice(0, n), slice(n, 2 * n)

    def rate(t: torch.Tensor) -> float:
        return t.float().mean().item()

    tol = 0.04
    for p in (g, loc):
        assert abs(rate(p["flip"]) - cfg.hflip_p) < tol
        assert abs(rate(p["jitter"]) - cfg.color_jitter_p) < tol
        assert abs(rate(p["grayscale"]) - cfg.grayscale_p) < tol
        assert p["sigma"].min() >= cfg.blur_sigma[0] and p["sigma"].max() <= cfg.blur_sigma[1]
        assert abs(p["sigma"].mean().item() - sum(cfg.blur_sigma) / 2) < 0.05
    assert rate(g["blur"][view1]) == cfg.blur_p_global1 == 1.0
    assert abs(rate(g["blur"][view2]) - cfg.blur_p_global2) < tol
    assert abs(rate(loc["blur"]) - cfg.blur_p_local) < tol
    assert rate(g["solarize"][view1]) == 0.0 and rate(loc["solarize"]) == 0.0  # second global crop only
    assert abs(rate(g["solarize"][view2]) - cfg.solarize_p_global2) < tol
    for p, scale in ((g, cfg.global_crops_scale), (loc, cfg.local_crops_scale)):
        area = p["boxes"][:, 2] * p["boxes"][:, 3] / 64
        assert area.min() >= scale[0] - 17 / 64 and area.max() <= scale[1] + 17 / 64


# ------------------------------------------------------------------------------------- collate
def test_collate_gpu_has_the_cpu_batch_keys_and_masks():
    mask_cfg = MaskConfig()
    batch = images(6, size=16)
    aug = GPUMultiCrop(replace(SMALL, global_crops_size=16, local_crops_size=8))
    positions = torch.arange(40, 46)
    out = collate_gpu(batch, positions, torch.arange(6), aug, mask_cfg, patch_size=4, seed=3)
    assert set(out) == BATCH_KEYS
    assert out["num_skipped"] == 0 and out["skipped_paths"] == []
    assert out["masks"].shape == (12, 16) and out["masks"].dtype == torch.bool
    assert torch.equal(out["positions"], positions) and torch.equal(out["labels"], torch.arange(6))
    samples = [
        {
            "global_crops": [torch.zeros(3, 16, 16)] * 2,
            "local_crops": [torch.zeros(3, 8, 8)] * 3,
            "label": 0,
            "position": int(p),
        }
        for p in positions
    ]
    cpu = collate_multicrop(samples, mask_cfg, 4, numpy_rng(3, STREAM_MASKS, 40))
    assert set(cpu) == BATCH_KEYS
    assert torch.equal(cpu["masks"], out["masks"]) and torch.equal(cpu["mask_indices"], out["mask_indices"])
    assert cpu["n_masked_patches"] == out["n_masked_patches"] > 0
    torch.testing.assert_close(cpu["mask_weights"], out["mask_weights"])
    assert (
        cpu["global_crops"].shape == out["global_crops"].shape and cpu["local_crops"].shape == out["local_crops"].shape
    )


def test_gpu_train_loader_follows_the_sampler_and_resumes():
    n, batch = 40, 6
    data, labels = images(n, size=16, seed=9), torch.arange(n) % 10
    crops = replace(SMALL, global_crops_size=16, local_crops_size=8)

    def loader(start: int, workers: int = 0) -> GPUTrainLoader:
        return GPUTrainLoader(
            data, labels, crops, MaskConfig(), 4, batch, seed=1, rank=1, world_size=2, start_iteration=start,
            mask_workers=workers,
        )  # fmt: skip

    full = loader(0)
    stream = iter(full)
    batches = [next(stream) for _ in range(4)]
    assert full.state_dict()["position"] == 4 * batch * 2
    expected = iter(InfiniteSampler(n, seed=1, rank=1, world_size=2, return_positions=True))
    for b in batches:
        items = [next(expected) for _ in range(batch)]
        assert b["positions"].tolist() == [p for p, _ in items]
        assert b["labels"].tolist() == [int(labels[i]) for _, i in items]
    resumed = next(iter(loader(2)))
    for key in ("global_crops", "local_crops", "masks", "positions"):
        assert torch.equal(resumed[key], batches[2][key]), key
    with_workers = next(iter(loader(2, workers=1)))
    assert torch.equal(with_workers["masks"], batches[2]["masks"])


def test_build_gpu_train_loader_feeds_the_meta_arch():
    """``data.pipeline=gpu``: the trainer's model takes the device batches unchanged."""
    from tiny_config import TINY

    from dinov2.train.meta_arch import SSLMetaArch

    cfg = load_config("train/demo", TINY + ["data.pipeline=gpu"])
    assert cfg.data.pipeline == "gpu"
    loader = build_gpu_train_loader(cfg.data, cfg.model.patch_size, device="cpu", seed=0)
    assert loader.images.shape[1:] == (3, 16, 16) and loader.num_skipped == 0
    batch = next(iter(loader))
    assert set(batch) == BATCH_KEYS
    assert batch["global_crops"].shape == (16, 3, 16, 16) and batch["local_crops"].shape == (16, 3, 8, 8)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    step = model(batch, teacher_temp=0.05)
    step.loss.backward()
    assert torch.isfinite(step.loss)


def test_decode_dataset_sizes():
    from dinov2.data.arrays import ArrayDataset

    same = ArrayDataset(np.zeros((3, 10, 12, 3), dtype=np.uint8), np.array([1, 2, 3]))
    x, y = decode_dataset(same, num_threads=2)
    assert x.shape == (3, 10, 12, 3) and x.dtype == torch.uint8 and y.tolist() == [1, 2, 3]
    x, _ = decode_dataset(same, indices=[2, 0], size=8)
    assert x.shape == (2, 8, 8, 3)


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_runs_on_the_gpu_with_the_same_operations_and_rates():
    device = torch.device("cuda")
    n = 4096
    cfg = CropsConfig(global_crops_size=32, local_crops_size=16, local_crops_number=6)
    batch = images(n, size=32).to(device)
    aug = GPUMultiCrop(cfg)
    out = aug(batch, device_generator(device, 0), return_params=True)
    again = aug(batch, device_generator(device, 0))
    assert out["global_crops"].device.type == "cuda" and out["global_crops"].shape == (2 * n, 3, 32, 32)
    for key in ("global_crops", "local_crops"):
        assert torch.equal(out[key], again[key])
    g = out["params"]["global"]
    assert g["solarize"][:n].sum() == 0 and abs(g["solarize"][n:].float().mean().item() - cfg.solarize_p_global2) < 0.03
    assert abs(g["flip"].float().mean().item() - cfg.hflip_p) < 0.03
    assert abs(g["blur"][n:].float().mean().item() - cfg.blur_p_global2) < 0.03
    # the operations give the CPU's results on the GPU
    x = batch[:8].permute(0, 3, 1, 2).float() / 255
    shift = torch.linspace(-0.1, 0.1, 8, device=device)
    torch.testing.assert_close(adjust_hue(x, shift).cpu(), adjust_hue(x.cpu(), shift.cpu()), atol=1e-5, rtol=0)
    sigma = torch.linspace(0.1, 2.0, 8, device=device)
    torch.testing.assert_close(
        gaussian_blur(x, sigma, 5).cpu(), gaussian_blur(x.cpu(), sigma.cpu(), 5), atol=1e-5, rtol=0
    )
    loader = GPUTrainLoader(batch, torch.zeros(n, dtype=torch.long), cfg, MaskConfig(), 4, 256, mask_workers=2)
    stream = iter(loader)
    first, second = next(stream), next(stream)
    assert set(first) == BATCH_KEYS
    for key in ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "labels", "positions"):
        assert first[key].device.type == "cuda", key
    assert not torch.equal(first["positions"], second["positions"])
