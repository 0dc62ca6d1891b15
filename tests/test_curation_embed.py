"""The ``embed`` stage: images → sharded normalised embeddings, resumable, split across tasks.

A tiny random ViT (exported in our format) embeds a folder of small synthetic images with two
corrupt files among them; the results are checked against a direct forward of the backbone.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_curation import embeddings as emb_io
from data_curation.cli import main
from data_curation.config import CurationConfig, load_curation_config
from data_curation.embed import resolve_task, run_embed, task_shards
from dinov2.config import Config, ModelConfig
from dinov2.eval import save_backbone
from dinov2.eval.features import eval_transform
from dinov2.models import build_backbone

N_IMAGES = 30
BAD = ("img_008.jpg", "img_023.png")  # a truncated JPEG and a text file named .png


def tiny_config() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(
        arch="vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, layerscale_init=None
    )
    cfg.data.crops.global_crops_size = 16
    cfg.data.crops.mean = [0.5, 0.5, 0.5]
    cfg.data.crops.std = [0.25, 0.25, 0.25]
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run dir with a tiny random backbone, and a folder of N_IMAGES images (two unreadable)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("embed")
    backbone = build_backbone(tiny_config().model).eval()
    save_backbone(backbone, tiny_config(), root / "run", "teacher_backbone.safetensors")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        name = f"img_{i:03d}.{'png' if i % 2 else 'jpg'}"
        where = images / "sub" if i >= 20 else images
        Image.fromarray(rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)).save(where / name)
    bad_jpeg = images / BAD[0]
    bad_jpeg.write_bytes(bad_jpeg.read_bytes()[:200])
    (images / "sub" / BAD[1]).write_text("not an image\n")
    return {"root": root, "run": root / "run", "images": images, "backbone": backbone}


def config(setup, **embed) -> CurationConfig:
    cfg = CurationConfig(progress=False)
    cfg.embed.input.path = str(setup["images"])
    cfg.embed.model.path = str(setup["run"])
    cfg.embed.shard_size = 8
    cfg.embed.batch_size = 5
    for key, value in embed.items():
        setattr(cfg.embed, key, value)
    return cfg


def reference(setup, paths, patch_mean=False):
    """Direct forward of the backbone on the listed files (resize 16, centre crop 16)."""
    transform = eval_transform(16, 16, [0.5] * 3, [0.25] * 3)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        out = setup["backbone"](x)
    f = torch.cat([out["cls"], out["patch"].mean(1)], 1) if patch_mean else out["cls"]
    return torch.nn.functional.normalize(f, dim=-1).numpy()


def test_embed_folder_skips_corrupt_files_and_matches_the_backbone(setup, tmp_path):
    summary = run_embed(tmp_path, config(setup))
    assert summary["finalized"] and summary["n_images"] == N_IMAGES and summary["n_shards"] == 4
    assert summary["count"] == N_IMAGES - 2 and summary["num_skipped"] == 2
    d = tmp_path / "embeddings"
    meta = emb_io.read_meta(d)
    assert meta["dtype"] == "float16" and meta["dim"] == 32 and meta["shard_sizes"] == [8, 7, 7, 6]
    assert meta["model_id"].startswith("ours:") and meta["feature"]["crop"] == 16
    skipped = (d / "skipped.txt").read_text().splitlines()
    assert sorted(os.path.basename(p) for p in skipped) == sorted(BAD)
    x, paths = emb_io.load_embeddings(d)
    assert not set(skipped) & set(paths) and all(os.path.isfile(p) for p in paths)
    assert emb_io.valid_rows(x).all()
    np.testing.assert_allclose(x, reference(setup, paths), atol=2e-3)  # float16 storage
    stats = json.loads((d / "stats_00001.json").read_text())
    assert stats["images"] == 8 and stats["skipped"] == 1 and stats["images_per_s"] > 0


def test_resume_rewrites_only_missing_shards_and_finalized_rerun_is_a_no_op(setup, tmp_path, monkeypatch):
    cfg = config(setup)
    run_embed(tmp_path, cfg)
    d = tmp_path / "embeddings"
    before = {s: os.stat(emb_io.shard_path(d, s)).st_mtime_ns for s in range(4)}
    # interrupted run: shard 2 and the finalized files are gone
    emb_io.shard_path(d, 2).unlink()
    (d / "meta.json").unlink()
    summary = run_embed(tmp_path, cfg)
    assert summary["shards_written"] == 1 and summary["finalized"]
    after = {s: os.stat(emb_io.shard_path(d, s)).st_mtime_ns for s in range(4)}
    assert [s for s in range(4) if after[s] != before[s]] == [2]
    meta_bytes = (d / "meta.json").read_bytes()

    import data_curation.embed as embed_mod

    def no_model(*args, **kwargs):
        raise AssertionError("a finished embed must not load the model")

    monkeypatch.setattr(embed_mod, "load_model", no_model)
    summary = run_embed(tmp_path, cfg)
    assert summary["finalized"] and summary["shards_written"] == 0
    assert (d / "meta.json").read_bytes() == meta_bytes  # downstream fingerprints unchanged


def test_array_tasks_split_shards_and_the_last_one_finalizes(setup, tmp_path, capsys):
    assert task_shards(4, 1, 3) == [1] and task_shards(7, 0, 3) == [0, 3, 6]
    base = [
        "embed",
        "--workdir",
        str(tmp_path),
        "progress=false",
        f"embed.input.path={setup['images']}",
        f"embed.model.path={setup['run']}",
        "embed.shard_size=8",
        "embed.dtype=float32",
    ]
    base[0] = "embed,dedup"  # dedup runs only once the embeddings are finalized
    assert main([*base, "--shard-index", "1", "--num-shards", "2"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 1 and out[0]["stage"] == "embed" and out[0]["finalized"] is False
    d = tmp_path / "embeddings"
    assert emb_io.list_shards(d) == [1, 3] and not (d / "meta.json").exists()
    assert main([*base, "--shard-index", "0", "--num-shards", "2"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["stage"] for o in out] == ["embed", "dedup"] and out[0]["finalized"] is True
    assert out[1]["n_images"] == N_IMAGES - 2
    x, paths = emb_io.load_embeddings(d)
    assert x.dtype == np.float32 and len(paths) == N_IMAGES - 2
    np.testing.assert_allclose(x, reference(setup, paths), atol=1e-5)
    assert main([*base, "--shard-index", "2", "--num-shards", "2"]) == 2
    assert main([*base, "--shard-index", "0"]) == 2


def test_resolve_task_from_slurm_array_environment():
    assert resolve_task(-1, 0, {}) == (0, 1)
    assert resolve_task(3, 4, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "9"}) == (3, 4)
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_task(-1, 0, env) == (2, 4)
    with pytest.raises(ValueError):
        resolve_task(-1, 3, {})


def test_changed_settings_need_force_and_patch_mean_doubles_the_dim(setup, tmp_path):
    run_embed(tmp_path, config(setup))
    with pytest.raises(RuntimeError, match="differs in: feature"):
        run_embed(tmp_path, config(setup, patch_mean=True))
    summary = run_embed(tmp_path, config(setup, patch_mean=True, shard_size=16), force=True)
    assert summary["n_shards"] == 2 and summary["shards_written"] == 2
    d = tmp_path / "embeddings"
    assert emb_io.list_shards(d) == [0, 1] and not (d / "stats_00002.json").exists()
    x, paths = emb_io.load_embeddings(d)
    assert x.shape == (N_IMAGES - 2, 64)
    np.testing.assert_allclose(x, reference(setup, paths, patch_mean=True), atol=2e-3)


def test_flip_average_embeds_a_mirrored_copy_as_its_original(setup, tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        image = rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{i}_a.png")
        Image.fromarray(np.ascontiguousarray(image[:, ::-1])).save(folder / f"{i}_b.png")
    rows = {}
    for flip in (False, True):
        cfg = config(setup, flip_average=flip)
        cfg.embed.input.path = str(folder)
        cfg.embed.dtype = "float32"
        run_embed(tmp_path / str(flip), cfg)
        x, paths = emb_io.load_embeddings(tmp_path / str(flip) / "embeddings")
        rows[flip] = {os.path.basename(p): v for p, v in zip(paths, x)}
    for i in range(3):
        assert np.abs(rows[False][f"{i}_a.png"] - rows[False][f"{i}_b.png"]).max() > 1e-3
        np.testing.assert_allclose(rows[True][f"{i}_a.png"], rows[True][f"{i}_b.png"], atol=1e-5)
    plain = reference(setup, [folder / f"{i}_{s}.png" for i in range(3) for s in "ab"])
    both = plain[0::2] + plain[1::2]
    expected = both / np.linalg.norm(both, axis=1, keepdims=True)
    np.testing.assert_allclose(np.stack([rows[True][f"{i}_a.png"] for i in range(3)]), expected, atol=1e-5)
    with pytest.raises(RuntimeError, match="differs in: feature"):
        cfg.embed.flip_average = False
        run_embed(tmp_path / "True", cfg)


def test_file_list_input_and_interop_weights_give_the_same_embeddings(setup, tmp_path):
    """The same weights in the timm layout (``interop``) embed a file list exactly like our export."""
    from safetensors.torch import save_file

    from dinov2.interop import export_state_dict

    timm_weights = tmp_path / "vit_timm_layout.safetensors"
    save_file({k: v.contiguous() for k, v in export_state_dict(setup["backbone"], "timm").items()}, str(timm_weights))
    files = sorted(str(p) for p in setup["images"].rglob("*.*") if p.name not in BAD)[:12]
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in files))
    common = [
        "progress=false",
        "embed.input.kind=filelist",
        f"embed.input.path={tmp_path / 'list.txt'}",
        "embed.crop=16",
        "embed.mean=[0.5,0.5,0.5]",
        "embed.std=[0.25,0.25,0.25]",
        "embed.dtype=float32",
    ]
    ours = load_curation_config(None, [*common, f"embed.model.path={setup['run']}"])
    theirs = load_curation_config(
        None,
        [
            *common,
            "embed.model.kind=interop",
            f"embed.model.path={timm_weights}",
            "embed.model.num_heads=2",
            "embeddings=emb_interop",
        ],
    )
    run_embed(tmp_path, ours)
    run_embed(tmp_path, theirs)
    a, pa = emb_io.load_embeddings(tmp_path / "embeddings")
    b, pb = emb_io.load_embeddings(tmp_path / "emb_interop")
    assert pa == pb == files
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert emb_io.read_meta(tmp_path / "emb_interop")["model_id"].startswith("interop:")


def test_timm_model_name_with_a_local_weights_file(setup, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    weights = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), weights)
    cfg = config(setup)
    cfg.embed.model.kind, cfg.embed.model.name, cfg.embed.model.path = "timm", "vit_tiny_patch16_224", str(weights)
    cfg.embed.model.img_size = 32
    cfg.embed.shard_size = 100
    summary = run_embed(tmp_path, cfg)
    assert summary["count"] == N_IMAGES - 2
    x, paths = emb_io.load_embeddings(tmp_path / "embeddings")
    meta = emb_io.read_meta(tmp_path / "embeddings")
    assert x.shape[1] == 192 and meta["model_id"].startswith("timm:") and meta["feature"]["crop"] == 32
    transform = eval_transform(32, 32, meta["feature"]["mean"], meta["feature"]["std"])
    with torch.no_grad():
        direct = model.forward_features(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[:4]]))
    np.testing.assert_allclose(x[:4], torch.nn.functional.normalize(direct[:, 0], dim=-1).numpy(), atol=2e-3)


def test_too_many_corrupt_images_is_a_clear_error(setup, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(25):
        (folder / f"{i}.jpg").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        run_embed(tmp_path, config(setup, shard_size=100, input=type(CurationConfig().embed.input)(path=str(folder))))


@pytest.mark.gpu
def test_embed_on_gpu_with_bf16_autocast_matches_cpu(setup, tmp_path):
    cpu = run_embed(tmp_path / "cpu", config(setup, device="cpu", dtype="float32"))
    gpu = run_embed(tmp_path / "gpu", config(setup, device="cuda", dtype="float32"))
    assert cpu["count"] == gpu["count"]
    a, _ = emb_io.load_embeddings(tmp_path / "cpu" / "embeddings")
    b, _ = emb_io.load_embeddings(tmp_path / "gpu" / "embeddings")
    cos = (a * b).sum(1)
    assert cos.min() > 0.98, cos.min()


# ----------------------------------------------------------------------------------- array jobs
def test_sharded_dedup_search_gives_the_dedup_stage_outputs(tmp_path):
    """prepare → 3 search tasks (submitit's in-process debug executor) → merge == the dedup stage."""
    pytest.importorskip("submitit")
    pytest.importorskip("faiss")
    from data_curation.dedup import run_dedup
    from data_curation.slurm import run_sharded_dedup

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    x[400:] = x[:100] + 0.05 * rng.normal(size=(100, 16))  # 100 planted copies
    x[7] = 0  # an unusable row
    cfg = CurationConfig(progress=False)
    cfg.dedup.k, cfg.dedup.threshold, cfg.dedup.keep = 8, 0.95, "most_connected"
    for wd in (tmp_path / "single", tmp_path / "sharded"):
        emb_io.write_embeddings(wd / "embeddings", x, [f"img{i}" for i in range(len(x))], shard_size=128)
    reference = run_dedup(tmp_path / "single", cfg)
    summary = run_sharded_dedup(tmp_path / "sharded", cfg, 3, {"cluster": "debug"})
    assert summary["search_tasks"] == 3 and summary["n_pairs"] == reference["n_pairs"] >= 99
    for name in ("kept.npy", "labels.npy", "pairs.npy"):
        a, b = np.load(tmp_path / "single/dedup" / name), np.load(tmp_path / "sharded/dedup" / name)
        assert np.array_equal(a, b), name
    reports = [json.loads((tmp_path / w / "dedup/components.json").read_text()) for w in ("single", "sharded")]
    assert reports[1].pop("search_tasks") == 3 and reports[0] == reports[1]
    mtime = os.stat(tmp_path / "sharded/dedup/kept.npy").st_mtime_ns
    run_dedup(tmp_path / "sharded", cfg)  # same fingerprint: the stage is already done
    assert os.stat(tmp_path / "sharded/dedup/kept.npy").st_mtime_ns == mtime

    # a compressed index: candidates within a margin are re-scored with the exact cosine
    cfg.index.kind, cfg.index.nlist, cfg.index.nprobe, cfg.index.pq_m, cfg.index.pq_nbits = "ivfpq", 4, 4, 8, 6
    run_sharded_dedup(tmp_path / "sharded", cfg, 2, {"cluster": "debug"}, rescore_margin=0.2)
    pairs = np.load(tmp_path / "sharded/dedup/pairs.npy")
    exact = np.load(tmp_path / "single/dedup/pairs.npy")
    assert pairs["i"].tolist() == exact["i"].tolist() and pairs["j"].tolist() == exact["j"].tolist()
    np.testing.assert_allclose(pairs["sim"], exact["sim"], atol=2e-3)  # float16 rows


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):
    """The suite's local SLURM cluster (tests/conftest.py), with this process pointed at it."""
    pytest.importorskip("submitit")
    for key in ("SLURM_CONF", "PATH"):
        monkeypatch.setenv(key, slurm_cluster.env[key])
    return slurm_cluster


@pytest.mark.slurm
def test_embed_as_a_two_task_slurm_array(setup, slurm, tmp_path):
    from data_curation.slurm import submit_array, wait_all

    cfg = config(setup, dtype="float32")
    options = {"cluster": "slurm", "mem_gb": 2, "cpus_per_task": 1, "timeout_min": 10, "slurm_array_parallelism": 2}
    jobs = submit_array("embed", tmp_path, cfg, num_shards=2, executor_options=options)
    results = wait_all(jobs)
    assert sorted(r["task"] for r in results) == ["0/2", "1/2"]
    assert sum(r["shards_written"] for r in results) == 4 and any(r["finalized"] for r in results)
    x, paths = emb_io.load_embeddings(tmp_path / "embeddings")
    assert len(paths) == N_IMAGES - 2
    np.testing.assert_allclose(x, reference(setup, paths), atol=1e-5)
