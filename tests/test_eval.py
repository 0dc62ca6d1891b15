"""Evaluation: k-NN and linear probe on features with known answers, on CIFAR-10 (small), and sharded
feature extraction / k-NN over two gloo processes."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinov2.data import ArrayDataset, BlobDataset
from dinov2.eval import eval_transform, extract_features, knn_classify, knn_predict, linear_probe
from dinov2.eval.features import shard_indices, unshard
from dinov2.eval.linear import stratified_split, train_linear_heads
from dinov2.models import create_vit


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# ------------------------------------------------------------------------------------------- k-NN
def test_knn_hand_computed_votes():
    # Train points on the unit circle at 0° (class 0), 10° and 20° (class 1), 180° (class 2); query at 4°.
    # Similarities: cos 4° = .99756 (class 0), cos 6° = .99452 and cos 16° = .96126 (class 1).
    # k=1: class 0. k=3: class 1 / class 0 vote ratio = exp(-.00304/T) + exp(-.0363/T), which is
    # 0.958 + 0.595 = 1.55 > 1 at T=0.07 (class 1 wins) but 0.738 + 0.026 = 0.76 < 1 at T=0.01.
    train = torch.tensor([unit(0), unit(10), unit(20), unit(180)]) * 5.0  # scale: cosine ignores it
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([unit(4)])
    assert knn_predict(train, labels, query, ks=(1, 3), temperature=0.07) == {
        1: torch.tensor([0]),
        3: torch.tensor([1]),
    }
    assert knn_predict(train, labels, query, ks=(3,), temperature=0.01)[3].item() == 0
    # k larger than the train set: all 4 neighbours; class 2 (similarity -.998) adds ~nothing.
    assert knn_predict(train, labels, query, ks=(200,), temperature=0.07)[200].item() == 1
    acc = knn_classify(train, labels, torch.cat([query, query]), torch.tensor([1, 0]), ks=(1, 3))
    assert acc == {1: 50.0, 3: 50.0}


def test_knn_clustered_gaussians_are_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 3

    def draw(n):
        y = torch.arange(n) % 5
        return centres[y] + 0.3 * torch.randn(n, 32, generator=g), y

    xtr, ytr = draw(500)
    xte, yte = draw(200)
    acc = knn_classify(xtr, ytr, xte, yte, batch_size=64)
    assert acc == {10: 100.0, 20: 100.0, 100: 100.0, 200: 100.0}


def reference_knn(train, train_labels, test, ks, temperature, num_classes):
    """Brute force in float64 numpy: every similarity, a full sort, one vote per k."""
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = te @ tr.T
    order = np.argsort(-sims, axis=1, kind="stable")
    out = {}
    for k in ks:
        kk = min(k, len(train))
        preds = []
        for q in range(len(test)):
            votes = np.zeros(num_classes)
            for j in order[q, :kk]:
                votes[train_labels[j]] += np.exp(sims[q, j] / temperature)
            preds.append(int(np.argmax(votes)))
        out[k] = np.array(preds)
    return out


def test_knn_matches_bruteforce_reference():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 7, size=300)
    test = rng.normal(size=(50, 16)).astype(np.float32)
    ks = (1, 5, 20, 1000)
    expected = reference_knn(train.astype(np.float64), labels, test.astype(np.float64), ks, 0.07, 7)
    got = knn_predict(
        torch.from_numpy(train),
        torch.from_numpy(labels),
        torch.from_numpy(test),
        ks,
        batch_size=16,
        train_chunk_size=64,  # several query batches and a running top-k over chunks
    )
    for k in ks:
        np.testing.assert_array_equal(got[k].numpy(), expected[k], err_msg=f"k={k}")
    assert got[1].dtype == torch.int64


def test_knn_rejects_bad_input():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="negative"):
        knn_predict(x, torch.tensor([0, -1, 0, 1]), x)
    with pytest.raises(ValueError, match="ks"):
        knn_predict(x, y, x, ks=(0,))
    with pytest.raises(ValueError, match="labels"):
        knn_classify(x, y, x, y[:2])


# ------------------------------------------------------------------------------------ linear probe
def separable(n: int, seed: int, classes: int = 4, dim: int = 16):
    """Linearly separable with a margin: coordinate ``y`` is in [2.5, 3.5], all others in [-0.5, 0.5]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.rand(n, dim, generator=g) - 0.5
    x[torch.arange(n), y] += 3.0
    return x * 4.0 + 10.0, y  # an arbitrary scale and offset (standardization undoes them)


def test_linear_probe_separable_features():
    xtr, ytr = separable(800, 0)
    xte, yte = separable(400, 1)
    out = linear_probe(xtr, ytr, xte, yte, epochs=10, seed=0)
    print("linear separable:", out)
    assert out["test_acc"] >= 99.0
    assert out["val_acc"][out["best_lr"]] == max(out["val_acc"].values()) >= 99.0
    assert out["num_train"] + out["num_val"] == 800 and out["num_val"] == 80
    assert set(out["val_acc"]) == {1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0}
    # a tiny learning rate barely moves the heads in 10 epochs: the sweep must matter
    assert out["val_acc"][1e-4] < out["val_acc"][out["best_lr"]]
    again = linear_probe(xtr, ytr, xte, yte, epochs=10, seed=0)
    assert again == out  # deterministic


def test_linear_probe_reuse_head_without_refit():
    (xtr, ytr), (xte, yte) = separable(400, 2, classes=3), separable(300, 3, classes=3)
    xtr, xte = (xtr - 10.0) / 4.0, (xte - 10.0) / 4.0  # well-scaled already: no standardization needed
    out = linear_probe(xtr, ytr, xte, yte, lrs=(0.01, 0.1), epochs=5, refit=False, standardize=False)
    assert out["test_acc"] >= 99.0 and out["best_lr"] in (0.01, 0.1)


def test_heads_trained_jointly_equal_heads_trained_alone():
    x, y = separable(300, 4)
    joint = train_linear_heads(x, y, [0.001, 0.01, 0.1], 4, epochs=2, seed=3)
    alone = train_linear_heads(x, y, [0.01], 4, epochs=2, seed=3)
    torch.testing.assert_close(joint.weights[1], alone.weights[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(joint.biases[1], alone.biases[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(joint.weights[0], joint.weights[2])


def test_stratified_split():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 1)
    fit, val = stratified_split(labels, 0.1, seed=5)
    assert torch.equal(torch.sort(torch.cat([fit, val])).values, torch.arange(81))
    assert torch.bincount(labels[val], minlength=3).tolist() == [5, 3, 0]
    assert torch.equal(val, stratified_split(labels, 0.1, seed=5)[1])
    assert not torch.equal(val, stratified_split(labels, 0.1, seed=6)[1])


# ------------------------------------------------------------------------------------ features
def tiny_vit(**kw):
    base = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_register_tokens=1)
    return create_vit("vit_small", **(base | kw))


def random_arrays(n: int, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 3)


def test_extract_features_matches_direct_forward():
    torch.manual_seed(0)
    model = tiny_vit().train()
    data = random_arrays(10)
    tf = eval_transform()
    feats, labels = extract_features(model, data, tf, batch_size=4, progress=False)
    assert model.training  # restored
    assert feats.dtype == torch.float32 and feats.shape == (10, 32) and labels.tolist() == data.labels.tolist()
    with torch.no_grad():
        out = model.eval()(torch.stack([tf(data[i][0]) for i in range(10)]))
    torch.testing.assert_close(feats, F.normalize(out["cls"], dim=-1), rtol=1e-4, atol=1e-5)
    both, _ = extract_features(model, data, tf, batch_size=3, patch_mean=True, normalize=False, progress=False)
    torch.testing.assert_close(both, torch.cat([out["cls"], out["patch"].mean(1)], 1), rtol=1e-4, atol=1e-5)
    assert not both.is_inference()  # usable for training a linear head


def test_flip_average_gives_an_image_and_its_mirror_the_same_row():
    torch.manual_seed(0)
    model = tiny_vit(layerscale_init=1.0)  # at 1e-5 the blocks barely touch the CLS token: every image looks alike
    data = random_arrays(6)
    mirrored = ArrayDataset(np.ascontiguousarray(data.images[:, :, ::-1]), data.labels)
    tf = eval_transform()
    plain, _ = extract_features(model, data, tf, batch_size=4, progress=False)
    plain_mirrored, _ = extract_features(model, mirrored, tf, batch_size=4, progress=False)
    assert (plain - plain_mirrored).abs().max() > 1e-3  # the ViT is not mirror-invariant by itself
    avg, _ = extract_features(model, data, tf, batch_size=4, flip_average=True, progress=False)
    avg_mirrored, _ = extract_features(model, mirrored, tf, batch_size=4, flip_average=True, progress=False)
    torch.testing.assert_close(avg, avg_mirrored, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(avg, F.normalize(plain + plain_mirrored, dim=-1), rtol=1e-4, atol=1e-5)
    raw, _ = extract_features(model, data, tf, batch_size=4, normalize=False, flip_average=True, progress=False)
    with torch.no_grad():
        x = torch.stack([tf(data[i][0]) for i in range(6)])
        expected = (model.eval()(x)["cls"] + model(x.flip(-1))["cls"]) / 2
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-5)


def test_shard_and_unshard_roundtrip():
    n, world = 11, 3
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert {len(s) for s in shards} == {4}
    stacked = torch.tensor(shards)[..., None].float()
    assert unshard(stacked, n).flatten().tolist() == list(range(n))


# ------------------------------------------------------------------------------------ distributed
def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)  # the same data on both ranks
        train, labels = torch.randn(301, 8, generator=g), torch.randint(0, 5, (301,), generator=g)
        test = torch.randn(40, 8, generator=g)
        # k-NN over a sharded train set (uneven shards: 151 and 150 rows) equals the single-process one
        sharded = knn_predict(
            train[rank::world], labels[rank::world], test, (1, 10, 200), batch_size=16, distributed=True
        )
        single = knn_predict(train, labels, test, (1, 10, 200), batch_size=16)
        for k in single:
            assert torch.equal(sharded[k], single[k]), k
        # sharded extraction, gathered back into dataset order (7 images: shards of 4 and 3)
        torch.manual_seed(0)
        model = tiny_vit(depth=1)
        data = random_arrays(7)
        feats, ys = extract_features(model, data, eval_transform(), batch_size=2, progress=False)
        local, local_y = extract_features(model, data, eval_transform(), batch_size=2, progress=False, gather=False)
        with torch.no_grad():
            direct = F.normalize(model.eval()(torch.stack([eval_transform()(data[i][0]) for i in range(7)]))["cls"])
        torch.testing.assert_close(feats, direct, rtol=1e-4, atol=1e-5)
        assert ys.tolist() == data.labels.tolist()
        assert local_y.tolist() == data.labels[rank::world].tolist() and len(local) == len(range(rank, 7, world))
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # several processes or a whole benchmark: the full suite, not the < 3 min fast loop
def test_distributed_knn_and_extraction_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


# ------------------------------------------------------------------------------------ CIFAR-10
class DownsampledPixels(nn.Module):
    """A fixed, training-free feature map: the normalized image average-pooled to 8×8 (192-D)."""

    patch_size = 4

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # extract_features reads the device from it

    def forward(self, x):
        pooled = F.avg_pool2d(x, 4)
        return {"cls": pooled.flatten(1), "patch": pooled.flatten(2).transpose(1, 2)}


@pytest.fixture(scope="module")
def cifar_pixel_features(shared_data):
    small = shared_data / "cifar10-small"
    tf = eval_transform(mean=(0.4913, 0.4821, 0.4465), std=(0.2452, 0.2428, 0.2606))
    out = {}
    for split in ("train", "test"):
        data = BlobDataset(shared_data / "cifar10", split, np.load(small / f"{split}_idx.npy"))
        out[split] = extract_features(DownsampledPixels(), data, tf, batch_size=500, progress=False)
    return out


def test_knn_on_cifar10_small_pixels(cifar_pixel_features):
    (xtr, ytr), (xte, yte) = cifar_pixel_features["train"], cifar_pixel_features["test"]
    assert xtr.shape == (10000, 192) and xte.shape == (5000, 192)
    assert torch.bincount(ytr).tolist() == [1000] * 10
    acc = knn_classify(xtr, ytr, xte, yte)
    print("cifar10-small 8x8-pixel k-NN top-1 %:", {k: round(a, 2) for k, a in acc.items()})
    assert all(a > 30.0 for a in acc.values())  # chance is 10 %; measured ~38-41 %


def test_linear_on_cifar10_small_pixels(cifar_pixel_features):
    (xtr, ytr), (xte, yte) = cifar_pixel_features["train"], cifar_pixel_features["test"]
    out = linear_probe(xtr, ytr, xte, yte, epochs=5, seed=0)
    print(
        "cifar10-small 8x8-pixel linear:",
        {k: out[k] for k in ("best_lr", "test_acc")},
        {lr: round(a, 1) for lr, a in out["val_acc"].items()},
    )
    assert out["test_acc"] > 30.0  # chance is 10 %; measured ~40 %
    assert out["best_lr"] > 1e-4  # the sweep picks a rate that trains
