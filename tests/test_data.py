"""Tests of dinov2.data: datasets, robustness to bad files, sampler, masks, crops, collate, loader."""

from __future__ import annotations

import io
import logging
import os
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.config import DataConfig, DatasetConfig, MaskConfig
from dinov2.data import (
    ArrayDataset,
    BlobDataset,
    DemoDataset,
    FileListDataset,
    ImageFolderDataset,
    InfiniteSampler,
    ManifestDataset,
    MaskingGenerator,
    MultiCropAugmentation,
    build_dataset,
    build_train_loader,
    collate_multicrop,
    generate_demo,
    sample_masks,
)
from dinov2.data.augmentations import blur_kernel_size
from dinov2.data.augmented import AugmentedDataset
from dinov2.data.filelist import parse_text_line
from dinov2.data.samplers import epoch_permutation
from dinov2.data.seeding import seeded_torch_rng
from dinov2.data.string_array import StringArray


# ------------------------------------------------------------------------------------------ helpers
def write_image(path, seed: int = 0, size: int = 24, fmt: str | None = None) -> bytes:
    """Write a random RGB image to ``path`` (format from the extension) and return its bytes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt or ("JPEG" if str(path).endswith(".jpg") else "PNG"))
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return buffer.getvalue()


def write_bad_files(root) -> list[str]:
    """A truncated JPEG, a garbage file and an empty file in ``root``; their paths."""
    truncated, garbage, empty = (os.path.join(root, n) for n in ("trunc.jpg", "garbage.jpg", "empty.png"))
    data = write_image(truncated, seed=99)
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with open(garbage, "wb") as f:
        f.write(b"this is not an image" * 10)
    open(empty, "wb").close()
    return [truncated, garbage, empty]


def tiny_data_cfg(kind: str = "demo", path: str = "", **overrides) -> DataConfig:
    cfg = DataConfig()
    cfg.dataset.kind, cfg.dataset.path = kind, path
    cfg.dataset.demo_num_train = 64
    cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number = 32, 16, 2
    cfg.batch_size_per_gpu, cfg.num_workers, cfg.pin_memory = 4, 0, False
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def expected_skips(bad: list[str], n_samples: int, seed: int, root: str | None = None) -> int:
    """Decode failures of the first ``n_samples`` of the stream of a folder whose files (sorted, as the
    folder dataset lists them) include ``bad``: each drawn record skips the bad files from it up to
    the next good one, wrapping around."""
    root = root or os.path.dirname(bad[0])
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    is_bad = [os.path.join(root, f) in set(bad) for f in files]
    n, total = len(files), 0
    for position in range(n_samples):
        index = int(epoch_permutation(n, seed, position // n)[position % n])
        while is_bad[index % n]:
            total, index = total + 1, index + 1
    return total


# ------------------------------------------------------------------------------------------ folder
def test_folder_with_subfolders_has_labels(tmp_path):
    for i, cls in enumerate(["dog", "cat", "bird"]):
        write_image(tmp_path / cls / f"{i}.jpg", seed=i)
        write_image(tmp_path / cls / "nested" / f"{i}.png", seed=10 + i)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["bird", "cat", "dog"]
    assert len(ds) == 6
    by_class = {ds.path(i).split(os.sep)[-2 if "nested" not in ds.path(i) else -3]: ds[i][1] for i in range(6)}
    assert by_class == {"bird": 0, "cat": 1, "dog": 2}
    image, label = ds[0]
    assert image.mode == "RGB" and image.size == (24, 24) and isinstance(label, int)


def test_folder_without_subfolders_is_unlabelled(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", seed=i)
    ds = build_dataset(DatasetConfig(kind="folder", path=str(tmp_path)))
    assert ds.classes == [] and [ds[i][1] for i in range(3)] == [-1, -1, -1]


def test_missing_path_is_a_one_line_error_naming_the_config_key(tmp_path):
    missing = str(tmp_path / "nope")
    for kind in ("folder", "filelist", "manifest", "arrays", "blobs"):
        with pytest.raises(FileNotFoundError) as info:
            build_dataset(DatasetConfig(kind=kind, path=missing))
        message = str(info.value)
        assert missing in message and "data.dataset.path" in message and "\n" not in message


def test_empty_folder_and_unknown_kind_are_clear_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="no images found under"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match="unknown data.dataset.kind 'foo'"):
        build_dataset(DatasetConfig(kind="foo", path=str(tmp_path)))


def test_string_array_round_trips():
    strings = ["a/b.jpg", "", "ünïcode/画像.png", "x" * 300]
    packed = StringArray(strings)
    assert len(packed) == 4 and list(packed) == strings and packed[-2] == strings[-2]
    with pytest.raises(IndexError):
        packed[4]


# ------------------------------------------------------------------------------------------ bad files
def test_bad_files_are_skipped_counted_and_warned_once(tmp_path, caplog):
    for i in range(6):
        write_image(tmp_path / f"good{i}.jpg", seed=i)
    bad = write_bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dinov2.data.base"):
        for _ in range(2):  # two passes: each bad file fails twice but is reported once
            samples = [ds.get(i) for i in range(len(ds))]
    assert all(s.image.size == (24, 24) for s in samples)
    # sorted order: empty, garbage, good0..5, trunc; a bad record is replaced by the next good one,
    # wrapping around: per pass get(0) skips 2, get(1) skips 1, get(8) skips 3 (trunc, empty, garbage)
    assert ds.num_skipped == 12 and sorted(ds.skipped_paths) == sorted(bad)
    for path in bad:
        assert sum(path in r.getMessage() for r in caplog.records) == 1
    truncated, garbage, empty = bad
    assert ds.get(1).index == 2 and ds.get(1).skipped == (garbage,)
    assert ds.get(8).index == 2 and ds.get(8).skipped == (truncated, empty, garbage)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_over_bad_files_keeps_batch_size_and_reports_skips(tmp_path, num_workers):
    for i in range(9):
        write_image(tmp_path / "a" / f"{i}.jpg", seed=i)
    bad = write_bad_files(tmp_path / "a")
    cfg = tiny_data_cfg("folder", str(tmp_path), num_workers=num_workers)
    loader = build_train_loader(cfg, patch_size=4, seed=0)
    batches = [b for _, b in zip(range(6), loader)]  # 24 samples: more than one epoch of 12
    assert all(b["global_crops"].shape == (8, 3, 32, 32) for b in batches)
    assert all(b["labels"].tolist() == [0] * 4 for b in batches)
    # every draw of a bad record is a skip event, repeats too: the stream's records (sampler order, tested
    # above) each skip the run of bad files that starts at them (the next decodable record replaces them) …
    assert sum(b["num_skipped"] for b in batches) == expected_skips(bad, 24, seed=0)
    assert loader.num_skipped == len(bad) == 3 and loader.skipped_paths == set(bad)  # … the loader counts files


def test_mostly_bad_dataset_stops_with_a_clear_error(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"good{i}.png", seed=i)
    for i in range(30):
        (tmp_path / f"bad{i:02d}.jpg").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=0.5)
    with pytest.raises(RuntimeError) as info:
        for i in range(len(ds)):
            ds.get(i)
    message = str(info.value)
    assert "images failed to decode under" in message and str(tmp_path) in message and "\n" not in message


# ------------------------------------------------------------------------------------------ lists
def test_text_line_parsing():
    assert parse_text_line("a/b.jpg 3") == ("a/b.jpg", "3")
    assert parse_text_line("a/b.jpg,7\n") == ("a/b.jpg", "7")
    assert parse_text_line("dir with space/b.jpg") == ("dir with space/b.jpg", None)
    assert parse_text_line("dir with space/b.jpg 2") == ("dir with space/b.jpg", "2")
    assert parse_text_line("  # comment") is None and parse_text_line("   ") is None


def test_file_list_txt_and_csv(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", seed=1)
    write_image(tmp_path / "imgs" / "b c.png", seed=2)
    absolute = str(tmp_path / "elsewhere" / "d.png")
    write_image(absolute, seed=3)
    (tmp_path / "list.txt").write_text(f"# images\nimgs/a.png 4\n\nimgs/b c.png\n{absolute},1\n")
    ds = FileListDataset(tmp_path / "list.txt")
    assert len(ds) == 3 and ds.labels.tolist() == [4, -1, 1]
    assert ds.path(2) == absolute and ds[1][0].size == (24, 24)

    (tmp_path / "with_header.csv").write_text("path,label\nimgs/a.png,cat\nimgs/b c.png,dog\nimgs/a.png,\n")
    ds = build_dataset(DatasetConfig(kind="filelist", path=str(tmp_path / "with_header.csv")))
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1, -1]
    (tmp_path / "no_header.csv").write_text("imgs/a.png,2\nimgs/b c.png,0\n")
    assert FileListDataset(tmp_path / "no_header.csv").labels.tolist() == [2, 0]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no images"):
        FileListDataset(tmp_path / "empty.txt")


def test_manifest(tmp_path):
    write_image(tmp_path / "x.jpg", seed=1)
    write_image(tmp_path / "y.jpg", seed=2)
    (tmp_path / "manifest.csv").write_text("path,source,label\nx.jpg,pool_a,3\ny.jpg,pool_b,\n")
    ds = build_dataset(DatasetConfig(kind="manifest", path=str(tmp_path / "manifest.csv")))
    assert isinstance(ds, ManifestDataset) and len(ds) == 2
    assert ds.sources == ["pool_a", "pool_b"] and ds.labels.tolist() == [3, -1]
    assert ds[0][0].mode == "RGB"
    (tmp_path / "bad.csv").write_text("path,label\nx.jpg,1\n")
    with pytest.raises(ValueError, match="lacks column"):
        ManifestDataset(tmp_path / "bad.csv")


def test_arrays_and_npz(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    ds = ArrayDataset(images)
    assert len(ds) == 5 and ds[2][1] == -1 and np.array_equal(np.asarray(ds[2][0]), images[2])
    np.savez(tmp_path / "arrays.npz", images=images, labels=np.arange(5))
    ds = build_dataset(DatasetConfig(kind="arrays", path=str(tmp_path / "arrays.npz")))
    assert ds[4][1] == 4
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(images.astype(np.float32))


def test_blobs_with_subset_and_a_corrupt_entry(tmp_path):
    encoded = [write_image(tmp_path / "src" / f"{i}.jpg", seed=i) for i in range(4)]
    encoded[2] = encoded[2][:100]  # corrupt
    offsets = np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64)
    np.save(tmp_path / "train_jpeg.npy", np.frombuffer(b"".join(encoded), dtype=np.uint8))
    np.save(tmp_path / "train_jpeg_offsets.npy", offsets)
    np.save(tmp_path / "train_y.npy", np.array([5, 6, 7, 8], dtype=np.int16))
    np.save(tmp_path / "train_subset.npy", np.array([3, 2, 1]))
    cfg = DatasetConfig(kind="blobs", path=str(tmp_path), subset_path=str(tmp_path / "{split}_subset.npy"))
    ds = build_dataset(cfg)
    assert isinstance(ds, BlobDataset) and len(ds) == 3 and ds.labels.tolist() == [8, 7, 6]
    decoded = np.asarray(ds[0][0])
    assert decoded.shape == (24, 24, 3)
    sample = ds.get(1)  # blob 2 is corrupt: replaced by the next subset entry (blob 1)
    assert sample.label == 6 and sample.skipped == (f"{ds.source}[2]",)


def test_cifar10_blobs_decode(shared_data):
    ds = build_dataset(DatasetConfig(kind="cifar10_blobs", path=str(shared_data / "cifar10"), split="test"))
    assert len(ds) == 10000 and ds[0][0].size == (32, 32) and ds[9999][1] == 9
    small = DatasetConfig(
        kind="cifar10_blobs",
        path=str(shared_data / "cifar10"),
        split="test",
        subset_path=str(shared_data / "cifar10-small" / "{split}_idx.npy"),
    )
    assert np.bincount(build_dataset(small).labels).tolist() == [500] * 10


# ------------------------------------------------------------------------------------------ demo
def test_demo_dataset_is_deterministic_labelled_and_fast():
    images, labels = generate_demo("train", num_samples=200, image_size=32, seed=0)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [20] * 10
    again, _ = generate_demo("train", num_samples=50, image_size=32, seed=0)
    assert np.array_equal(images[:50], again)  # image i does not depend on how many are drawn
    assert not np.array_equal(generate_demo("test", 50)[0], again)
    assert not np.array_equal(generate_demo("train", 50, seed=1)[0], again)
    # colours carry no class information: the mean colour per class is about the same
    class_means = np.stack([images[labels == c].mean(axis=(0, 1, 2)) for c in range(10)])
    assert class_means.std(axis=0).max() < 25
    ds = build_dataset(DatasetConfig(kind="demo", split="test", demo_num_test=30, demo_image_size=48))
    assert isinstance(ds, DemoDataset) and len(ds) == 30 and ds[3][0].size == (48, 48) and ds[3][1] == 3
    assert ds.classes[0] == "circle"


# ------------------------------------------------------------------------------------------ sampler
def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_sampler_resume_equals_uninterrupted_stream():
    full = take(iter(InfiniteSampler(10, seed=3)), 35)
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    assert full[:10] != full[10:20]  # each epoch has its own permutation
    first = InfiniteSampler(10, seed=3)
    stream = iter(first)
    take(stream, 13)
    first.advance(13)
    resumed = InfiniteSampler(10, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert take(iter(resumed), 22) == full[13:]
    assert take(iter(InfiniteSampler(10, seed=3, start=13)), 22) == full[13:]
    with pytest.raises(ValueError, match="seed"):
        InfiniteSampler(10, seed=4).load_state_dict(first.state_dict())


def test_sampler_shards_are_disjoint_and_cover_each_epoch():
    n = 11
    ranks = [iter(InfiniteSampler(n, seed=0, rank=r, world_size=2, return_positions=True)) for r in range(2)]
    pairs = [take(it, n) for it in ranks]  # 22 positions: exactly two epochs
    positions = [{p for p, _ in rank_pairs} for rank_pairs in pairs]
    assert not positions[0] & positions[1] and positions[0] | positions[1] == set(range(2 * n))
    by_position = dict(pairs[0] + pairs[1])
    for epoch in range(2):
        assert sorted(by_position[p] for p in range(epoch * n, (epoch + 1) * n)) == list(range(n))
    # the ranks read the same global stream a single process reads
    single = take(iter(InfiniteSampler(n, seed=0)), 2 * n)
    assert [by_position[p] for p in range(2 * n)] == single
    # resuming at another world size continues the same global stream
    three = [iter(InfiniteSampler(n, seed=0, rank=r, world_size=3, start=6, return_positions=True)) for r in range(3)]
    resumed = dict(p for it in three for p in take(it, 4))
    assert [resumed[p] for p in range(6, 18)] == single[6:18]


# ------------------------------------------------------------------------------------------ masks
def connected_components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a 2-D bool mask."""
    seen, sizes = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], queue, size = True, deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        sizes.append(size)
    return sizes


def test_mask_statistics():
    grid, n_crops, rng = (16, 16), 32, np.random.default_rng(0)
    n_patches = 256
    ratios, masked_first_half, top = [], [], []
    for _ in range(20):
        masks = sample_masks(n_crops, grid, 0.5, (0.1, 0.5), rng)
        masked = masks.reshape(n_crops, -1).any(axis=1)
        assert masked.sum() == 16  # exactly round(2B * 0.5) crops are masked
        masked_first_half.append(masked[:16].all())
        fractions = np.sort(masks[masked].reshape(16, -1).mean(axis=1))
        bounds = np.linspace(0.1, 0.5, 17)
        # stratified: the k-th smallest ratio lies in the k-th stratum [b_k, b_k+1]: the target is
        # floor(ratio * 256) patches, never exceeded, and missed by at most one patch (measured)
        assert np.all(fractions <= bounds[1:]), fractions - bounds[1:]
        assert np.all(fractions >= bounds[:-1] - 2 / n_patches), fractions - bounds[:-1]
        for mask in masks[masked]:
            assert min(connected_components(mask)) >= 4
        ratios.extend(fractions)
        top.append(fractions[-1])
    # the top stratum [0.475, 0.5] is drawn: its mean (0.4855 measured) is above a dropped stratum's 0.476
    assert np.mean(top) > 0.48, np.mean(top)
    # mean target 0.3 less the floor and the rare one-patch miss (0.2977 measured); a mask one patch
    # short everywhere gives 0.2946
    assert 0.2965 <= np.mean(ratios) <= 0.3, np.mean(ratios)
    assert not all(masked_first_half)  # which crops are masked is shuffled


def test_masking_generator_never_exceeds_its_target_and_is_reproducible():
    masker = MaskingGenerator((14, 14), min_num_patches=4)
    for target in (0, 3, 4, 10, 50, 98):
        mask = masker(target, np.random.default_rng(target))
        assert mask.shape == (14, 14) and mask.sum() <= target
        assert mask.sum() >= target - 1 or target < 4
    a = sample_masks(8, 14, generator=np.random.default_rng(5))
    b = sample_masks(8, 14, generator=np.random.default_rng(5))
    assert np.array_equal(a, b)


def test_masking_generator_usually_hits_its_target_exactly():
    """625 seeded draws (targets 4..128 of 256): 90.6 % reach the target exactly, the others stop one
    patch short (measured); a generator one patch short of every target reaches none."""
    masker = MaskingGenerator((16, 16), min_num_patches=4)
    short = np.array(
        [t - masker(t, np.random.default_rng(1000 * t + s)).sum() for t in range(4, 129) for s in range(5)]
    )
    assert short.min() >= 0 and short.max() <= 1
    assert (short == 0).mean() >= 0.85, (short == 0).mean()


# ------------------------------------------------------------------------------------------ crops
def test_crops_are_seeded_by_stream_position_not_by_image():
    """The same image at two stream positions (two epochs) gets different crops; the same position
    always the same ones."""
    cfg = tiny_data_cfg()
    ds = AugmentedDataset(build_dataset(cfg.dataset), MultiCropAugmentation(cfg.crops), seed=0)
    n = len(ds)
    first, again, next_epoch = ds[(3, 3)], ds[(3, 3)], ds[(3 + n, 3)]
    assert torch.equal(first["global_crops"][0], again["global_crops"][0])
    assert not torch.equal(first["global_crops"][0], next_epoch["global_crops"][0])
    assert not torch.equal(first["local_crops"][0], next_epoch["local_crops"][0])


def test_multicrop_shapes_ranges_and_determinism():
    cfg = tiny_data_cfg().crops
    cfg.local_crops_number = 3
    augment = MultiCropAugmentation(cfg)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    with seeded_torch_rng(7):
        out = augment(image)
    assert [t.shape for t in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 16, 16)] * 3
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    for crop in out["global_crops"] + out["local_crops"]:
        assert crop.dtype == torch.float32 and type(crop) is torch.Tensor
        pixels = crop * std + mean
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    with seeded_torch_rng(7):
        again = augment(image)
    assert all(torch.equal(a, b) for a, b in zip(out["global_crops"], again["global_crops"]))
    assert blur_kernel_size(224, 2.0) == blur_kernel_size(98, 2.0) == 13  # ±3σ at every size (tests/test_blur.py)


def test_multicrop_without_randomness_is_resize_and_normalize():
    cfg = tiny_data_cfg().crops
    cfg.global_crops_scale = cfg.local_crops_scale = [1.0, 1.0]
    cfg.hflip_p = cfg.color_jitter_p = cfg.grayscale_p = 0.0
    cfg.blur_p_global1 = cfg.blur_p_global2 = cfg.blur_p_local = cfg.solarize_p_global2 = 0.0
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = MultiCropAugmentation(cfg)(Image.fromarray(pixels))
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(
        cfg.std
    )[:, None, None]
    assert torch.allclose(out["global_crops"][0], expected, atol=1e-5)
    assert torch.allclose(out["global_crops"][1], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ collate
def test_collate_is_view_major_with_consistent_masks():
    cfg = tiny_data_cfg()
    dataset = AugmentedDataset(DemoDataset("train", 8), MultiCropAugmentation(cfg.crops), seed=0)
    samples = [dataset[i] for i in range(4)]
    batch = collate_multicrop(samples, MaskConfig(), patch_size=4, generator=np.random.default_rng(0))
    assert batch["global_crops"].shape == (8, 3, 32, 32) and batch["local_crops"].shape == (8, 3, 16, 16)
    assert torch.equal(batch["global_crops"][1], samples[1]["global_crops"][0])
    assert torch.equal(batch["global_crops"][4 + 1], samples[1]["global_crops"][1])
    assert torch.equal(batch["local_crops"][4 + 2], samples[2]["local_crops"][1])
    masks = batch["masks"]
    assert masks.shape == (8, 64) and masks.dtype == torch.bool
    assert masks.any(dim=1).sum() == 4
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    assert batch["n_masked_patches"] == masks.sum() == len(batch["mask_weights"])
    # each masked crop's weights sum to 1
    crop_of_patch = batch["mask_indices"] // 64
    sums = torch.zeros(8).index_add_(0, crop_of_patch, batch["mask_weights"])
    assert torch.allclose(sums[masks.any(dim=1)], torch.ones(4))
    assert batch["labels"].tolist() == [0, 1, 2, 3] and batch["num_skipped"] == 0



def test_collate_counts_every_skip_event_of_the_batch():
    """A batch's ``num_skipped`` counts skip events, repeats included (one bad file that two samples of the
    batch each had to skip is two events); the loader and the run count files (issue 15)."""
    cfg = tiny_data_cfg()
    dataset = AugmentedDataset(DemoDataset("train", 8), MultiCropAugmentation(cfg.crops), seed=0)
    samples = [dict(dataset[i]) for i in range(4)]
    samples[0]["skipped"] = ("bad.jpg",)
    samples[2]["skipped"] = ("bad.jpg", "worse.png")
    batch = collate_multicrop(samples, MaskConfig(), patch_size=4, generator=np.random.default_rng(0))
    assert batch["num_skipped"] == 3 and batch["skipped_paths"] == ["bad.jpg", "bad.jpg", "worse.png"]

# ------------------------------------------------------------------------------------------ loader
def batches_equal(a: dict, b: dict) -> bool:
    tensors = ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "labels", "positions")
    return all(torch.equal(a[k], b[k]) for k in tensors)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_is_bit_identical(num_workers):
    cfg = tiny_data_cfg(num_workers=num_workers)
    dataset = build_dataset(cfg.dataset)
    rng_before = torch.get_rng_state()
    uninterrupted = build_train_loader(cfg, patch_size=4, seed=5, dataset=dataset)
    stream = iter(uninterrupted)
    first = [next(stream) for _ in range(4)]
    assert uninterrupted.state_dict()["position"] == 16
    expected = next(stream)
    resumed = build_train_loader(cfg, patch_size=4, seed=5, start_iteration=4, dataset=dataset)
    assert batches_equal(next(iter(resumed)), expected)
    assert not batches_equal(first[0], first[1])
    assert expected["positions"].tolist() == [16, 17, 18, 19]
    # iterating again continues after what was consumed, however far the workers prefetched
    assert next(iter(uninterrupted))["positions"].tolist() == [20, 21, 22, 23]
    if num_workers == 0:  # the loader draws nothing from the caller's global RNG
        assert torch.equal(torch.get_rng_state(), rng_before)


def test_loader_ranks_split_the_global_batch():
    cfg = tiny_data_cfg()
    dataset = build_dataset(cfg.dataset)
    single = next(iter(build_train_loader(cfg, patch_size=4, seed=1, dataset=dataset)))
    cfg.batch_size_per_gpu = 2
    ranks = [
        next(iter(build_train_loader(cfg, patch_size=4, seed=1, rank=r, world_size=2, dataset=dataset)))
        for r in range(2)
    ]
    assert ranks[0]["positions"].tolist() == [0, 2] and ranks[1]["positions"].tolist() == [1, 3]
    # a sample's crops depend only on its stream position, not on the rank that made it
    assert torch.equal(ranks[1]["global_crops"][0], single["global_crops"][1])
    assert torch.equal(ranks[0]["local_crops"][2 + 1], single["local_crops"][4 + 2])
