"""Shards through curation: ``dinov2-curate pack`` (resumable per shard, deterministic, corrupt inputs
left out), and the round trip folder → pack → embed / dedup / cluster / sample / manifest →
export-shards → dinov2-train, all through the ``dinov2-curate`` entry point and ``train()``."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_config import TINY

from dinov2.data import ManifestDataset
from dinov2.data.shard_index import INDEX_SUFFIX
from dinov2.data.shards import ShardDataset, read_member

pytest.importorskip("faiss")
from data_curation.cli import main  # noqa: E402

CLASSES = ("cat", "dog", "owl")


def _image(seed: int, size: int = 18) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _folder(root: Path, per_class: int, duplicates: int = 0) -> dict[str, str]:
    """``root/{class}/img_{i}.jpg``; the first ``duplicates`` images of ``cat`` are copied byte for byte
    as ``copy_{i}.jpg``. Returns file path → class name."""
    classes = {}
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            path = root / name / f"img_{i:02d}.jpg"
            _image(100 * c + i).save(path, quality=90)
            classes[str(path)] = name
    for i in range(duplicates):
        copy = root / "cat" / f"copy_{i:02d}.jpg"
        copy.write_bytes((root / "cat" / f"img_{i:02d}.jpg").read_bytes())
        classes[str(copy)] = "cat"
    return classes


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run(stages: str, workdir: Path, *overrides: str) -> dict:
    """``dinov2-curate STAGES --workdir W key=value…``; the summary line of the last stage."""
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([stages, "--workdir", str(workdir), "progress=false", *overrides]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_pack_writes_labelled_shards_resumes_per_shard_and_refuses_to_mix_plans(tmp_path):
    images = tmp_path / "images"
    classes = _folder(images, per_class=3)
    (images / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    _image(7).save(images / "owl" / "lossless.bmp")
    out = tmp_path / "shards"
    args = ("pack", tmp_path / "wd", f"pack.path={images}", f"pack.output={out}", "pack.samples_per_shard=4")
    summary = _run(*args)
    assert (summary["n_images"], summary["n_samples"], summary["n_skipped"], summary["n_shards"]) == (11, 10, 1, 3)
    assert summary["dataset_path"] == str(out / "train-{000000..000002}.tar")
    assert (out / "skipped.txt").read_text().strip() == str(images / "dog" / "broken.jpg")
    names = [f"train-{s:06d}.tar" for s in range(3)]
    assert all((out / n).is_file() and (out / (n + INDEX_SUFFIX)).is_file() for n in names)

    def never(shard):
        raise AssertionError(f"{shard}: the index pack wrote beside it should have been used")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dinov2.data.shard_index.build_index", never)
        ds = ShardDataset(summary["dataset_path"])
    assert len(ds) == 10 and ds.shard_sizes.tolist() == summary["samples_per_shard"]  # planned 4, 4, 3; one left out
    by_path = {}
    for i in range(len(ds)):
        meta = json.loads(ds.metadata(i))
        by_path[meta["path"]] = i
        assert ds.label(i) == sorted(CLASSES).index(meta["class"])  # .cls: the sub-folder's label
    assert set(by_path) == set(classes) | {str(images / "owl" / "lossless.bmp")}
    for path in classes:  # JPEGs are stored as they were
        assert ds.encoded(by_path[path]) == Path(path).read_bytes()
    bmp = by_path[str(images / "owl" / "lossless.bmp")]
    assert ds.image_name(bmp).endswith(".png")  # other formats: re-encoded losslessly as PNG
    assert np.array_equal(np.asarray(ds.load(bmp)), np.asarray(_image(7)))
    shuffled = [json.loads(ds.metadata(i))["path"] for i in range(len(ds))]
    assert shuffled != sorted(shuffled)  # pack.shuffle: classes are mixed across shards

    # an interrupted run: shard 1 never appeared; the re-run writes it alone, byte for byte the same
    before = (out / names[1]).read_bytes()
    (out / names[1]).unlink()
    (out / f".{names[1]}.12345.tmp").write_bytes(b"partial")  # a crashed writer's leftover is ignored
    again = _run(*args)
    assert again["shards_written"] == 1 and (out / names[1]).read_bytes() == before
    assert _run(*args)["shards_written"] == 1  # complete: the stored summary, nothing rewritten
    with pytest.raises(RuntimeError, match="another pack plan.*--force"):
        _run(*args[:-1], "pack.samples_per_shard=6")
    _run("pack", tmp_path / "wd", "--force", *args[2:-1], "pack.samples_per_shard=6")
    assert sorted(p.name for p in out.glob("*.tar")) == names[:2] and len(ShardDataset(str(out))) == 10


def test_round_trip_folder_pack_curate_export_shards_train(tmp_path):
    from test_curation_embed import tiny_config

    from dinov2.config import load_config
    from dinov2.eval import save_backbone
    from dinov2.launch.run import train
    from dinov2.models import build_backbone

    images, wd = tmp_path / "images", tmp_path / "wd"
    classes = _folder(images, per_class=8, duplicates=4)  # 28 files, 4 exact copies
    packed = _run("pack", wd, f"pack.path={images}", "pack.samples_per_shard=8")
    assert packed["n_samples"] == 28 and packed["n_shards"] == 4

    torch.manual_seed(0)
    save_backbone(
        build_backbone(tiny_config().model).eval(), tiny_config(), tmp_path / "model", "teacher_backbone.safetensors"
    )
    curate = [
        "embed.input.kind=shards",
        f"embed.input.path={packed['dataset_path']}",
        f"embed.model.path={tmp_path / 'model'}",
        "embed.shard_size=10",
        "dedup.k=4",
        "dedup.threshold=0.999",
        "cluster.n_clusters=[6,2]",
        "cluster.sample_size=[2,1]",
        "cluster.niter=5",
        "sample.target_size=16",
    ]
    summary = _run("embed,dedup,cluster,sample,manifest", wd, *curate)
    rows = (wd / "manifest" / "manifest.csv").read_text().splitlines()[1:]
    paths = [row.split(",")[0] for row in rows]
    assert summary["n_rows"] == len(paths) == 16
    assert all(p.startswith(str(wd / "shards" / "train-")) and ".tar#" in p for p in paths)  # rows name shard samples
    dedup = json.loads((wd / "dedup" / "DONE").read_text())["summary"]
    assert dedup["n_kept"] == 24  # the 4 copies are gone: exactly one of each pair is kept
    originals = [read_member(p) for p in paths]
    assert len({_sha(image) for image, *_ in originals}) == 16
    manifest = ManifestDataset(wd / "manifest" / "manifest.csv")  # data.dataset.kind=manifest reads such rows
    decoded = Image.open(io.BytesIO(originals[3][0])).convert("RGB")
    assert np.array_equal(np.asarray(manifest.load(3)), np.asarray(decoded))

    exported = _run("export-shards", wd, "export_shards.samples_per_shard=5", *curate)
    assert (exported["n_samples"], exported["n_shards"]) == (16, 4)
    assert exported["samples_per_shard"] == [5, 5, 5, 1]
    ds = ShardDataset(exported["dataset_path"])
    got = {}
    for i in range(len(ds)):
        meta = json.loads(ds.metadata(i))
        got[meta["path"]] = (_sha(ds.encoded(i)), ds.label(i), meta["meta"]["path"], meta["meta"]["class"])
    assert set(got) == set(paths)  # every selected sample exactly once, named by where it came from
    for path, (image, label, pack_path, name) in got.items():
        assert image == _sha(read_member(path)[0])  # the bytes as packed, never re-encoded
        assert name == classes[pack_path] and label == sorted(CLASSES).index(name)  # .cls survived two packs
    order = [json.loads(ds.metadata(i))["path"] for i in range(len(ds))]
    assert order != paths  # shuffled

    run = load_config(
        "train/demo",
        TINY
        + [
            "data.dataset.kind=shards",
            f"data.dataset.path={exported['dataset_path']}",
            "data.shuffle_window=2",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_iterations=2",
            "eval.final_knn=false",
        ],
    )
    result = train(run)
    assert result.iterations == 2 and result.num_skipped == 0 and result.exported.is_file()
