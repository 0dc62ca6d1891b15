"""The copy-detection objective (``train.objective=copy_detection``): its loss against a hand computation,
its copy views, and training through the shared trainer — exact resume, FSDP2, export read by ``embed``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_config import TINY_MODEL, TINY_TRAIN

from dinov2.config import ConfigError, CopyAugmentConfig, load_config
from dinov2.data.copy_augmentations import COPY_KINDS, CopyViews, make_copy
from dinov2.launch.run import build_meta_arch, train
from dinov2.losses.copy_detection import CopyDetectionLoss, info_nce
from dinov2.losses.koleo import KoLeoLoss

COPY = (
    TINY_MODEL
    + TINY_TRAIN
    + [
        "train.objective=copy_detection",
        "data.dataset.kind=demo",
        "data.dataset.path=''",
        "data.dataset.demo_num_train=64",
        "data.dataset.demo_num_test=32",
        "data.dataset.demo_image_size=16",
        "data.crops.global_crops_size=16",
        "data.crops.local_crops_number=0",
        "data.masks.mask_probability=0",
        "data.batch_size_per_gpu=8",
        "data.num_workers=0",
        "eval.final_knn=false",
    ]
)


# ------------------------------------------------------------------------------------------- loss
def test_info_nce_matches_a_hand_computation():
    """Three images, two views each, in 2-D: every row's -log softmax of its positive among the other rows."""
    angles = [0.0, 0.3, 2.0, 2.4, 4.0, 3.7]  # view0 of images 0..2, then view1 of images 0..2
    z = [(math.cos(a), math.sin(a)) for a in angles]
    tau = 0.5
    expected = 0.0
    for i in range(6):
        positive = (i + 3) % 6
        logits = {j: (z[i][0] * z[j][0] + z[i][1] * z[j][1]) / tau for j in range(6) if j != i}
        expected += -(logits[positive] - math.log(sum(math.exp(v) for v in logits.values())))
    expected /= 6
    views = torch.tensor(z, dtype=torch.float64).reshape(2, 3, 2)
    assert info_nce(views, tau).item() == pytest.approx(expected, abs=1e-12)


def test_copy_detection_loss_is_infonce_plus_weighted_koleo():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    loss, parts = CopyDetectionLoss(temperature=0.1, entropy_weight=3.0)(a, b)
    na, nb = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    koleo = KoLeoLoss()(a) + KoLeoLoss()(b)
    torch.testing.assert_close(loss, info_nce(torch.stack([na, nb]), 0.1) + 3.0 * koleo)
    # KoLeo by hand: -mean log(distance to the nearest other row), per view
    d = torch.cdist(na.double(), na.double()) + torch.eye(5, dtype=torch.float64) * 9
    assert KoLeoLoss()(a).item() == pytest.approx(-torch.log(d.min(dim=1).values + 1e-8).mean().item(), abs=1e-5)
    assert parts["positive_sim"].item() == pytest.approx((na * nb).sum(-1).mean().item(), abs=1e-6)


# ------------------------------------------------------------------------------------------- views
def photo(size: int = 32) -> Image.Image:
    """A smooth, bright colour image (no black pixel anywhere)."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x), 0.5 + 0.4 * np.cos(5 * y), 0.6 + 0.3 * x * y], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.mark.parametrize("kind", COPY_KINDS)
def test_every_copy_kind_keeps_the_size_and_changes_the_image(kind):
    image = photo()
    copy = make_copy(image, kind, CopyAugmentConfig(), np.random.default_rng(3))
    assert copy.size == image.size and copy.mode == "RGB"
    assert not np.array_equal(np.asarray(copy), np.asarray(image))
    if kind == "rotate":  # the window cut after rotating holds no fill colour: no dark corner
        assert np.asarray(copy).min() > 20


def test_copy_views_are_a_function_of_the_torch_seed():
    cfg = load_config("train/copy_detection").copy_detection
    views = CopyViews(cfg, 16, [0.5] * 3, [0.25] * 3)
    torch.manual_seed(7)
    first = views(photo())
    torch.manual_seed(7)
    again = views(photo())
    assert first["local_crops"] == [] and len(first["global_crops"]) == 2
    assert first["global_crops"][0].shape == (3, 16, 16)
    for u, v in zip(first["global_crops"], again["global_crops"]):
        assert torch.equal(u, v)
    assert not torch.equal(first["global_crops"][0], first["global_crops"][1])


# ------------------------------------------------------------------------------------------- training
def test_copy_detection_trains_resumes_exactly_and_embed_reads_the_export(tmp_path):
    """6 steps straight vs 3 steps then a resumed run to 6: identical weights, optimizer-driven losses and
    metrics; the exported backbone embeds a folder through ``dinov2-curate embed``."""
    from data_curation import embeddings as emb_io
    from data_curation.cli import main as curate
    from dinov2.eval.backbone_io import load_backbone
    from dinov2.train.metrics import read_metrics

    common = COPY + ["train.max_iterations=6", "train.checkpoint_every=3"]
    straight = train(load_config("train/copy_detection", common + [f"train.output_dir={tmp_path / 'a'}"]))
    cut = common[:-2] + ["train.max_iterations=3", "train.checkpoint_every=3", "train.export_teacher=false"]
    train(load_config("train/copy_detection", cut + [f"train.output_dir={tmp_path / 'b'}"]))
    resumed = train(load_config("train/copy_detection", common + [f"train.output_dir={tmp_path / 'b'}"]))
    assert straight.iterations == resumed.iterations == 6
    a, _ = load_backbone(straight.exported)
    b, _ = load_backbone(resumed.exported)
    assert straight.exported.name == "student_backbone.safetensors"
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    log_a, log_b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    keys = ("loss", "infonce", "koleo", "grad_norm", "positive_sim")
    assert [{k: r[k] for k in keys} for r in log_a] == [{k: r[k] for k in keys} for r in log_b]
    assert np.isfinite([r["loss"] for r in log_a]).all()

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        photo(16 + 4 * i).save(images / f"{i}.png")
    argv = ["embed", "--workdir", str(tmp_path / "cur"), "progress=false", f"embed.input.path={images}"]
    assert curate([*argv, f"embed.model.path={tmp_path / 'a'}"]) == 0
    x, _ = emb_io.load_embeddings(tmp_path / "cur" / "embeddings")
    assert x.shape == (5, 32)


def test_copy_detection_under_fsdp_matches_the_plain_model():
    """FSDP2 (one gloo rank, fp32): the same loss and gradients as the unsharded meta-architecture."""
    from dinov2.data import build_train_loader
    from dinov2.distributed.env import distributed_session
    from dinov2.distributed.parallelize import parallelize

    cfg = load_config("train/copy_detection", COPY + ["distributed.param_dtype=fp32", "distributed.fsdp=true"])
    torch.manual_seed(0)
    plain = build_meta_arch(cfg, torch.device("cpu")).train()
    batch = next(iter(build_train_loader(cfg.data, cfg.model.patch_size, transform=plain.train_transform())))
    assert batch["global_crops"].shape == (16, 3, 16, 16)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    loss = plain(batch).loss
    loss.backward()
    with distributed_session("gloo", always=True) as env:
        sharded = build_meta_arch(cfg, torch.device("cpu"))
        sharded.load_state_dict(state)
        parallelize(sharded, cfg.distributed, env)
        sharded.train()
        sharded_loss = sharded(batch).loss
        sharded_loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in sharded.student.named_parameters() if p.grad is not None}
    torch.testing.assert_close(sharded_loss, loss, rtol=0, atol=1e-5)
    assert grads.keys() == {n for n, p in plain.student.named_parameters() if p.grad is not None}
    for name, p in plain.student.named_parameters():
        if p.grad is not None:  # (the iBOT mask token takes no part)
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "override,message",
    [("distill.enabled=true", "distill.enabled=false"), ("data.pipeline=gpu", "data.pipeline=cpu")],
)
def test_settings_the_objective_cannot_honour_are_config_errors(override, message):
    cfg = load_config("train/copy_detection", COPY + [override])
    with pytest.raises(ConfigError, match=message):
        build_meta_arch(cfg, torch.device("cpu"))


@pytest.mark.slow  # several processes or a whole benchmark: the full suite, not the < 3 min fast loop
def test_two_gloo_ranks_each_solve_their_own_infonce_and_log_the_mean(tmp_path):
    """torchrun, 2 ranks, FSDP2 over gloo: the first logged loss is the mean of the two ranks' losses, each
    computed in one process on that rank's batch (its negatives are its own images); the export loads."""
    import os
    import subprocess
    import sys

    from dinov2.data import build_train_loader
    from dinov2.eval.backbone_io import load_backbone
    from dinov2.train.metrics import read_metrics

    common = COPY + ["distributed.param_dtype=fp32", "train.max_iterations=2", "train.checkpoint_every=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "dinov2.launch.train_cli", "--config", "train/copy_detection", *common]
    cmd += [f"train.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    cfg = load_config("train/copy_detection", common)
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    model = build_meta_arch(cfg, torch.device("cpu")).train()
    losses = []
    for rank in range(2):
        loader = build_train_loader(
            cfg.data,
            cfg.model.patch_size,
            seed=cfg.train.seed,
            rank=rank,
            world_size=2,
            transform=model.train_transform(),
        )
        with torch.no_grad():
            losses.append(model(next(iter(loader))).loss.item())
    logged = read_metrics(tmp_path / "metrics.jsonl")[0]["loss"]
    assert logged == pytest.approx(sum(losses) / 2, abs=1e-5)
    assert abs(losses[0] - losses[1]) > 1e-3  # the ranks saw different images
    backbone, _ = load_backbone(tmp_path)
    assert backbone.embed_dim == 32
