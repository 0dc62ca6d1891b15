"""Both training pipelines hand the trainer a ``TrainBatches``: dict batches with the collate's keys,
the consumed sample position, resumption from a position and the count of undecodable records — and,
for the same config, the same samples and the same iBOT masks at the same place in the stream."""

from __future__ import annotations

import itertools

import pytest
import torch
from shard_fixtures import write_shards
from tiny_config import TINY

from dinov2.config import ConfigError, load_config
from dinov2.data import TRAIN_BATCH_KEYS, TrainBatches, build_dataset
from dinov2.data.loader import train_sampler
from dinov2.distributed.env import DistEnv
from dinov2.train.trainer import build_loader


def loaders() -> dict[str, TrainBatches]:
    """The trainer's loader of each pipeline for the tiny demo config, on the CPU."""
    return {
        pipeline: build_loader(
            load_config("train/demo", TINY + [f"data.pipeline={pipeline}"]), DistEnv(), torch.device("cpu"), 0
        )
        for pipeline in ("cpu", "gpu")
    }


def test_both_pipelines_are_train_batches_with_the_same_stream():
    built = loaders()
    assert {type(loader).__name__ for loader in built.values()} == {"TrainLoader", "GPUTrainLoader"}
    first = {}
    for pipeline, loader in built.items():
        assert isinstance(loader, TrainBatches), pipeline
        stream = iter(loader)
        first[pipeline], second = next(stream), next(stream)
        assert set(first[pipeline]) == TRAIN_BATCH_KEYS, pipeline
        assert first[pipeline]["global_crops"].shape == (16, 3, 16, 16), pipeline
        assert first[pipeline]["local_crops"].shape == (16, 3, 8, 8), pipeline
        assert loader.state_dict()["position"] == 16 and loader.num_skipped == 0, pipeline
        loader.load_state_dict({"position": 8})  # back one batch: the next iter() repeats the second
        again = next(iter(loader))
        assert torch.equal(again["positions"], second["positions"]), pipeline
        assert torch.equal(again["masks"], second["masks"]), pipeline
    cpu, gpu = first["cpu"], first["gpu"]
    for key in ("positions", "labels", "masks", "mask_indices", "mask_weights"):
        assert torch.equal(cpu[key], gpu[key]), key
    assert cpu["n_masked_patches"] == gpu["n_masked_patches"]


def test_both_pipelines_follow_the_shard_window_shuffle(tmp_path):
    """Old: ``data.pipeline=gpu`` built its own plain sampler and ignored ``data.shuffle_window``, so over
    shards its stream was another one than the CPU pipeline's (and a negative window passed unchecked)."""
    write_shards(tmp_path, 3, 7, size=16)  # 21 samples in 3 shards
    common = TINY + [
        "data.dataset.kind=shards",
        f"data.dataset.path={tmp_path / 'train-{000000..000002}.tar'}",
        "data.shuffle_window=2",
    ]
    streams = {}
    for pipeline in ("cpu", "gpu"):
        cfg = load_config("train/demo", common + [f"data.pipeline={pipeline}"])
        stream = iter(build_loader(cfg, DistEnv(), torch.device("cpu"), 0))
        streams[pipeline] = torch.cat([next(stream)["labels"] for _ in range(4)])
        windowed = train_sampler(cfg.data, build_dataset(cfg.data.dataset), cfg.train.seed, 0, 1, 0)
        expected = [index for _, index in itertools.islice(iter(windowed), 32)]
        labels = [build_dataset(cfg.data.dataset).label(i) for i in expected]
        assert streams[pipeline].tolist() == labels, pipeline
    assert torch.equal(streams["cpu"], streams["gpu"])
    bad = load_config("train/demo", common + ["data.pipeline=gpu", "data.shuffle_window=-1"])
    with pytest.raises(ConfigError, match="shuffle_window=-1"):
        build_loader(bad, DistEnv(), torch.device("cpu"), 0)
