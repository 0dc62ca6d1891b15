"""Both training pipelines hand the trainer a ``TrainBatches``: dict batches with the collate's keys,
the consumed sample position, resumption from a position and the count of undecodable records — and,
for the same config, the same samples and the same iBOT masks at the same place in the stream."""

from __future__ import annotations

import torch
from tiny_config import TINY

from dinov2.config import load_config
from dinov2.data import TRAIN_BATCH_KEYS, TrainBatches
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
