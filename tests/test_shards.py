"""``data.dataset.kind=shards``: tar shards in the webdataset layout, read at random through a cached
offset index; the shard-window shuffle; corrupt and truncated members; exact resume after kill -9;
every sample exactly once per epoch under 2-process FSDP (gloo, torchrun)."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_fixtures import encoded_image, truncated_jpeg, write_gnu_tar_shard, write_shards
from tiny_config import TINY

from dinov2.config import DataConfig
from dinov2.data import InfiniteSampler, build_dataset, build_train_loader
from dinov2.data.samplers import epoch_permutation, windowed_permutation
from dinov2.data.shard_index import INDEX_SUFFIX, build_index, index_paths, load_or_build_index
from dinov2.data.shards import ShardDataset, expand_braces, expand_shard_paths, read_member
from dinov2.train.checkpoint import read_progress

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------ paths
def test_brace_patterns_expand_like_webdataset_names(tmp_path):
    assert expand_braces("train-{000008..000011}.tar") == [f"train-{i:06d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="cannot expand"):
        expand_braces("x-{abc}.tar")
    paths = write_shards(tmp_path, 3, 1)
    spec = str(tmp_path / "train-{000000..000002}.tar")
    assert expand_shard_paths(spec) == [str(p) for p in paths]
    assert expand_shard_paths(str(tmp_path)) == [str(p) for p in paths]  # a folder: its *.tar, sorted
    assert expand_shard_paths(f"{paths[2]}::{paths[0]}") == [str(paths[2]), str(paths[0])]
    with pytest.raises(FileNotFoundError, match=r"train-000003.tar' does not exist \(and 1 more\)"):
        expand_shard_paths(str(tmp_path / "train-{000000..000004}.tar"))


# ------------------------------------------------------------------------------------------ index
def test_a_gnu_tar_shard_reads_back_byte_for_byte(tmp_path):
    """A shard written by GNU tar (not by us): keys in folders, a two-dot extension (``seg.png``: another
    field, not the image), sidecars before or after the image, a key without an image, webdataset's
    reserved ``__`` names."""
    images = {f"dir.v2/a{i}": encoded_image(i, fmt="JPEG" if i % 2 else "PNG") for i in range(4)}
    members = {
        "dir.v2/a0.cls": b"7\n",
        "dir.v2/a0.png": images["dir.v2/a0"],
        "dir.v2/a1.jpg": images["dir.v2/a1"],
        "dir.v2/a1.json": b'{"caption": "one"}',
        "dir.v2/a1.seg.png": encoded_image(99),
        "dir.v2/a2.PNG": images["dir.v2/a2"],
        "dir.v2/a2.cls": b"not a number",
        "only_text.txt": b"no image here",
        "__meta__.json": b"{}",
        "dir.v2/a3.jpeg": images["dir.v2/a3"],
        "dir.v2/a3.cls": b"3",
    }
    shard = write_gnu_tar_shard(tmp_path / "gnu.tar", members)
    ds = ShardDataset(str(shard))
    assert len(ds) == 4 and ds.shard_sizes.tolist() == [4]
    assert [ds.key(i) for i in range(4)] == list(images)
    for i, key in enumerate(images):
        assert ds.encoded(i) == images[key]
        assert ds.describe(i) == f"{shard}#{key}"
        assert np.array_equal(np.asarray(ds.load(i)), np.asarray(Image.open(io.BytesIO(images[key])).convert("RGB")))
    assert [ds.label(i) for i in range(4)] == [7, -1, -1, 3]
    assert ds.image_name(1) == "dir.v2/a1.jpg" and json.loads(ds.metadata(1)) == {"caption": "one"}
    assert ds.image_name(2) == "dir.v2/a2.png" and ds.metadata(0) is None
    assert read_member(f"{shard}#dir.v2/a3") == (images["dir.v2/a3"], "jpeg", 3, None)
    with pytest.raises(KeyError, match="only_text"):
        read_member(f"{shard}#only_text")


def test_index_is_built_once_beside_the_shard_and_rebuilt_when_the_shard_changes(tmp_path, monkeypatch):
    shard = write_gnu_tar_shard(tmp_path / "s.tar", {f"k{i}.png": encoded_image(i) for i in range(3)})
    beside = shard.with_name("s.tar" + INDEX_SUFFIX)
    assert not beside.exists()
    built = []
    monkeypatch.setattr("dinov2.data.shard_index.build_index", lambda p: built.append(p) or build_index(p))
    assert len(ShardDataset(str(shard))) == 3 and beside.is_file() and len(built) == 1
    assert len(ShardDataset(str(shard))) == 3 and len(built) == 1  # read from the cache, not rebuilt
    write_gnu_tar_shard(shard, {f"k{i}.png": encoded_image(i) for i in range(5)})  # the shard is replaced
    assert len(ShardDataset(str(shard))) == 5 and len(built) == 2


def test_index_goes_to_the_cache_dir_when_beside_is_not_writable(tmp_path, monkeypatch):
    shard = write_gnu_tar_shard(tmp_path / "ro.tar", {"k.png": encoded_image(0)})
    beside, cached = index_paths(shard, tmp_path / "cache")
    beside.mkdir()  # where the index would go cannot take a file (root ignores a read-only folder's mode)
    load_or_build_index(shard, None)  # no cache dir given: the default one (under $XDG_CACHE_HOME)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_or_build_index(shard, None).tar_size == shard.stat().st_size
    default_cached = index_paths(shard, None)[1]
    assert default_cached.is_file() and str(default_cached).startswith(str(tmp_path / "xdg"))
    # an explicit cache dir takes every new index, even where beside would be writable
    other = write_gnu_tar_shard(tmp_path / "rw.tar", {"k.png": encoded_image(1)})
    cfg = DataConfig().dataset
    cfg.kind, cfg.path, cfg.index_cache_dir = "shards", str(other), str(tmp_path / "cache")
    assert len(build_dataset(cfg)) == 1
    assert index_paths(other, tmp_path / "cache")[1].is_file() and not index_paths(other)[0].exists()
    assert cached.parent == tmp_path / "cache"


def test_threads_reading_many_shards_get_the_right_bytes(tmp_path, monkeypatch):
    """Threads share a dataset (the device pipeline decodes with a thread pool): with one open file per
    thread allowed, every read evicts another; no thread may close a descriptor another is reading."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr("dinov2.data.shards.MAX_OPEN_SHARDS", 1)
    write_shards(tmp_path, 6, 5, size=8)
    ds = ShardDataset(str(tmp_path))
    expected = [encoded_image(n, 8) for n in range(len(ds))]
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(ds)), 300)).tolist()
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(ds.encoded, order))
    assert all(data == expected[i] for i, data in zip(order, got, strict=True))


def test_compressed_and_empty_shards_are_clear_errors(tmp_path):
    import gzip

    shard = write_gnu_tar_shard(tmp_path / "a.tar", {"k.png": encoded_image(0)})
    (tmp_path / "z.tar").write_bytes(gzip.compress(shard.read_bytes()))
    with pytest.raises(ValueError, match="gzip-compressed.*decompress"):
        ShardDataset(str(tmp_path / "z.tar"))
    write_gnu_tar_shard(tmp_path / "text.tar", {"k.txt": b"x"})
    with pytest.raises(ValueError, match="no samples with an image member"):
        ShardDataset(str(tmp_path / "text.tar"))


# ---------------------------------------------------------------------------------------- shuffle
def test_window_shuffle_is_a_local_reproducible_permutation():
    sizes = [5, 3, 6, 4, 2, 5, 7]
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    order = windowed_permutation(sizes, 3, seed=1, epoch=0)
    assert sorted(order.tolist()) == list(range(sum(sizes)))
    assert np.array_equal(order, windowed_permutation(sizes, 3, seed=1, epoch=0))
    assert not np.array_equal(order, windowed_permutation(sizes, 3, seed=1, epoch=1))
    # consecutive positions walk through whole windows of 3 shards: cut where the shard set changes
    cursor, windows = 0, []
    while cursor < len(order):
        shards = set()
        for s in shard_of[order[cursor:]]:
            if s not in shards and len(shards) == 3:
                break
            shards.add(int(s))
        size = sum(sizes[s] for s in shards)
        assert {int(s) for s in shard_of[order[cursor : cursor + size]]} == shards  # the window is complete
        windows.append(shards)
        cursor += size
    assert [len(w) for w in windows] == [3, 3, 1] and set().union(*windows) == set(range(len(sizes)))
    # within a window the samples are mixed, not shard after shard
    first = shard_of[order[: sum(sizes[s] for s in windows[0])]]
    assert np.count_nonzero(np.diff(first)) > 3
    assert epoch_permutation(sum(sizes), 1, 0, True, sizes, 3).tolist() == order.tolist()
    # a window of one shard: shard after shard, each one's samples shuffled among themselves
    one = shard_of[windowed_permutation(sizes, 1, 0, 0)]
    runs = [int(one[0])] + [int(b) for a, b in zip(one[:-1], one[1:]) if a != b]
    assert sorted(runs) == list(range(len(sizes)))  # each shard is one run


def test_window_sampler_resumes_at_any_world_size():
    sizes = [4, 4, 3, 5]
    n = sum(sizes)

    def stream(world: int, start: int, count: int) -> list[int]:
        ranks = [
            iter(
                InfiniteSampler(
                    n,
                    seed=2,
                    rank=r,
                    world_size=world,
                    start=start,
                    return_positions=True,
                    group_sizes=sizes,
                    shuffle_window=2,
                )
            )
            for r in range(world)
        ]
        pairs = dict(p for it in ranks for p in (next(it) for _ in range(count // world)))
        return [pairs[p] for p in range(start, start + count)]

    single = stream(1, 0, 3 * n)
    assert single[:n] == windowed_permutation(sizes, 2, 2, 0).tolist()
    assert single[n : 2 * n] == windowed_permutation(sizes, 2, 2, 1).tolist()
    assert stream(2, 6, 24) == single[6:30] and stream(3, 9, 27) == single[9:36]
    sampler = InfiniteSampler(n, seed=2, group_sizes=sizes, shuffle_window=2)
    with pytest.raises(ValueError, match="shuffle_window"):
        InfiniteSampler(n, seed=2, group_sizes=sizes, shuffle_window=3).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="kind=shards"):
        InfiniteSampler(n, seed=2, shuffle_window=2)


# ------------------------------------------------------------------------------- corrupt members
def _corrupt_shards(folder: Path) -> tuple[str, list[str]]:
    """3 shards of 6 samples: a garbage member (sample 2), a truncated JPEG (sample 9) and a last shard
    cut short inside its last image (sample 17). Returns the dataset path and the bad samples' names."""
    paths = write_shards(folder, 3, 6, bad={2: b"not an image at all" * 4, 9: truncated_jpeg(9)})
    data = paths[2].read_bytes()
    index = build_index(paths[2])
    paths[2].write_bytes(data[: int(index.image_offset[5]) + 40])  # the copy stopped inside sample 17
    bad = [f"{paths[0]}#sample0002", f"{paths[1]}#sample0009", f"{paths[2]}#sample0017"]
    return str(folder / "train-{000000..000002}.tar"), bad


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_and_truncated_members_are_skipped_counted_by_file_and_named_once(tmp_path, caplog, num_workers):
    spec, bad = _corrupt_shards(tmp_path)
    cfg = DataConfig()
    cfg.dataset.kind, cfg.dataset.path = "shards", spec
    cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number = 16, 8, 1
    cfg.batch_size_per_gpu, cfg.num_workers, cfg.pin_memory, cfg.shuffle_window = 6, num_workers, False, 2
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(cfg, patch_size=4, seed=0)
        assert len(loader.dataset) == 18  # the cut shard keeps the header of its damaged last sample
        stream = iter(loader)
        batches = [next(stream) for _ in range(6)]  # two epochs
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert all(b["global_crops"].shape[0] == 2 * 6 for b in batches)  # replaced, so batches keep their size
    assert not {2, 9, 17} & set(labels)
    assert sorted(loader.skipped_paths) == bad  # counted by file: 3 files, each met in both epochs
    if num_workers == 0:  # a worker process logs in its own process, out of caplog's reach
        for name in bad:
            assert sum(name in r.getMessage() for r in caplog.records) == 1, name
        assert any("truncated" in r.getMessage() and bad[2] in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- exact resume, kill -9
CLI = [sys.executable, "-m", "dinov2.launch.train_cli", "--config", "train/demo"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.slow  # several processes or a whole benchmark: the full suite, not the < 3 min fast loop
def test_exact_resume_over_shards_after_kill_at_a_random_step(tmp_path):
    """kill -9 once checkpoint k exists (k drawn at random, or DINOV2_KILL_AT), at whatever step the run
    is in by then; the re-run resumes and exports a teacher bit-identical to an uninterrupted run's."""
    total = 6
    kill_at = int(os.environ.get("DINOV2_KILL_AT") or random.SystemRandom().randint(1, total - 3))
    write_shards(tmp_path / "shards", 3, 7, size=16)  # 21 samples, uneven against the global batch of 8
    common = TINY + [
        "data.dataset.kind=shards",
        f"data.dataset.path={tmp_path / 'shards' / 'train-{000000..000002}.tar'}",
        "data.shuffle_window=2",
        "data.num_workers=2",  # forked workers open the shards themselves
        "data.batch_size_per_gpu=8",
        f"train.max_iterations={total}",
        "train.checkpoint_every=1",
        "train.export_teacher=true",
        "eval.final_knn=false",
        "model.drop_path_rate=0.2",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(CLI + common + [f"train.output_dir={straight}"], check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(CLI + common + [f"train.output_dir={resumed}"], env=_env(), stderr=subprocess.DEVNULL)
    marker = resumed / "checkpoints" / f"ckpt_{kill_at:08d}" / ".metadata"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, f"the run ended before the kill (kill_at={kill_at})"
    assert not (resumed / "teacher_backbone.safetensors").exists()
    subprocess.run(CLI + common + [f"train.output_dir={resumed}"], check=True, env=_env(), capture_output=True)

    from safetensors.torch import load_file

    a = load_file(str(straight / "teacher_backbone.safetensors"))
    b = load_file(str(resumed / "teacher_backbone.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after a kill at checkpoint {kill_at}"


# ------------------------------------------------------------------ 2-process FSDP: once per epoch
@pytest.mark.slow  # several processes or a whole benchmark: the full suite, not the < 3 min fast loop
def test_two_fsdp_ranks_see_every_sample_exactly_once_per_epoch(tmp_path):
    shards, per_shard, window = 4, 4, 2
    write_shards(tmp_path / "shards", shards, per_shard, size=16)
    n = shards * per_shard  # 16 samples; 2 ranks x batch 4 = 8 per step: 2 steps per epoch
    overrides = TINY + [
        "data.dataset.kind=shards",
        f"data.dataset.path={tmp_path / 'shards'}",
        f"data.shuffle_window={window}",
        "data.batch_size_per_gpu=4",
        "data.num_workers=0",
        "train.max_iterations=4",
        "train.checkpoint_every=4",
        "train.export_teacher=false",
        "eval.final_knn=false",
        "distributed.param_dtype=fp32",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    record = tmp_path / "seen"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(TESTS / "shards_dist_worker.py"),
        str(record),
        *overrides,
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stderr[-5000:]
    seen: dict[int, int] = {}  # stream position -> label (= global sample number)
    for rank in range(2):
        batches = json.loads((record / f"rank{rank}.json").read_text())
        assert len(batches) == 4
        for positions, labels in batches:
            assert all(p % 2 == rank for p in positions)  # rank r reads positions r, r + 2, ...
            for p, label in zip(positions, labels, strict=True):
                assert p not in seen
                seen[p] = label
    assert sorted(seen) == list(range(2 * n))
    for epoch in range(2):
        labels = [seen[p] for p in range(epoch * n, (epoch + 1) * n)]
        assert sorted(labels) == list(range(n)), f"epoch {epoch}"
        # reads stay in a window of 2 shards: the first 8 positions of the epoch come from 2 shards
        window_shards = {label // per_shard for label in labels[: window * per_shard]}
        assert len(window_shards) == window
    state = read_progress(tmp_path / "run" / "checkpoints" / "ckpt_00000004")
    assert state["world_size"] == 2 and state["sample_position"] == 2 * n
