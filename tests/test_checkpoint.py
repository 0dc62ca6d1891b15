"""The checkpoint layout: one DCP save of model, optimizer, progress and RNG; the earlier layout still resumes.

(Resume exactness end to end: test_resume.py, test_distributed.py, test_scale.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from dinov2.train.checkpoint import CheckpointError, CheckpointManager, read_progress, saved_keys


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A two-layer model after one AdamW step in which only the first layer had a gradient (the second
    stands for the frozen prototype layer: it has no optimizer state)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model[0](torch.randn(5, 3)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _assert_same(a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]) -> None:
    for (key, x), y in zip(a[0].state_dict().items(), b[0].state_dict().values(), strict=True):
        assert torch.equal(x, y), key
    sa, sb = a[1].state_dict()["state"], b[1].state_dict()["state"]
    assert sorted(sa) == sorted(sb) == [0, 1]  # the second layer stays state-less
    for index in sa:
        for field in sa[index]:
            assert torch.equal(sa[index][field], sb[index][field]), (index, field)


def test_one_dcp_save_holds_model_optimizer_progress_and_rng(tmp_path):
    saved = _trained()
    path = CheckpointManager(tmp_path).save(7, *saved, sample_position=56)
    expected_draw = torch.rand(4)  # the generator as saved, one draw on
    assert path == tmp_path / "ckpt_00000007"
    assert {p.name for p in path.iterdir()} == {".metadata", "__0_0.distcp"}  # nothing beside the DCP save
    keys = saved_keys(path)
    assert {"model.0.weight", "model.1.bias", "optimizer.state.0.weight.exp_avg"} <= keys
    assert not any(k.startswith("optimizer.state.1.") for k in keys)
    assert {k for k in keys if k.startswith(("progress.", "rng."))} == {
        "progress.iteration",
        "progress.sample_position",
        "progress.world_size",
        "rng.rank0.cpu",
    }
    assert read_progress(path) == {"iteration": 7, "sample_position": 56, "world_size": 1}

    _check_resumes(tmp_path, saved, expected_draw, (7, 56, 1, path))


def _check_resumes(directory, saved, expected_draw, progress) -> None:
    """A fresh model and optimizer resume from ``directory`` to ``saved``'s state, the progress
    ``(iteration, sample_position, world_size, path)`` and the RNG stream that drew ``expected_draw``."""
    resumed = _fresh()
    state = CheckpointManager(directory).resume(*resumed)
    assert (state.iteration, state.sample_position, state.world_size, state.path) == progress
    _assert_same(saved, resumed)
    assert torch.equal(torch.rand(4), expected_draw)


def test_a_checkpoint_of_the_earlier_layout_resumes(tmp_path):
    """The layout written up to commit 12f1ab0: DCP {model, optimizer} + meta.json + rng_rank{r}.pt."""
    saved = _trained()
    path = tmp_path / "ckpt_00000003"
    state = {"model": get_model_state_dict(saved[0]), "optimizer": get_optimizer_state_dict(*saved)}
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save(state, checkpoint_id=path)
    torch.save({"cpu": torch.get_rng_state()}, path / "rng_rank0.pt")
    (path / "meta.json").write_text(json.dumps({"iteration": 3, "sample_position": 24, "world_size": 1}))
    expected_draw = torch.rand(4)

    _check_resumes(tmp_path, saved, expected_draw, (3, 24, 1, path))


def test_a_save_with_neither_progress_entry_nor_meta_json_is_rejected_by_name(tmp_path):
    model, optimizer = _trained()
    path = tmp_path / "ckpt_00000002"
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=path)
    with pytest.raises(CheckpointError, match=r"ckpt_00000002 \(CheckpointError: .* no progress entry .* no meta.json"):
        CheckpointManager(tmp_path).resume(*_fresh())


def test_keep_last_prunes_the_oldest(tmp_path):
    model, optimizer = _trained()
    manager = CheckpointManager(tmp_path, keep=2)
    for iteration in (1, 2, 3):
        manager.save(iteration, model, optimizer, sample_position=8 * iteration)
    assert [p.name for p in manager.complete()] == ["ckpt_00000002", "ckpt_00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000002", "ckpt_00000003"]  # no .tmp left


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only machine's view of a GPU run's checkpoint")
def test_a_checkpoint_with_a_cuda_generator_resumes_on_a_cpu_only_machine(tmp_path):
    """A GPU run also saves ``rng.rank{r}.cuda``; without CUDA only the CPU generator is read back."""
    saved = _trained()
    path = tmp_path / "ckpt_00000004"
    progress = {"iteration": 4, "sample_position": 32, "world_size": 1}
    cuda_state = torch.arange(16, dtype=torch.uint8)  # stands for torch.cuda.get_rng_state()
    state = {
        "model": get_model_state_dict(saved[0]),
        "optimizer": get_optimizer_state_dict(*saved),
        "progress": {k: torch.tensor(v) for k, v in progress.items()},
        "rng": {"rank0": {"cpu": torch.get_rng_state(), "cuda": cuda_state}},
    }
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save(state, checkpoint_id=path)
    assert "rng.rank0.cuda" in saved_keys(path)
    expected_draw = torch.rand(4)

    resumed = _fresh()
    assert CheckpointManager(tmp_path).resume(*resumed).iteration == 4
    _assert_same(saved, resumed)
    assert torch.equal(torch.rand(4), expected_draw)


def _two_rank_rng_round_trip(rank: int, folder: str) -> None:
    """Rank ``rank`` of 2: its own generator state saved, scrambled, and read back from its own key."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        model, optimizer = _trained()  # the same weights on both ranks (replicated, written once)
        torch.manual_seed(100 + rank)
        manager = CheckpointManager(Path(folder) / "checkpoints")
        manager.save(1, model, optimizer, sample_position=8)
        expected_draw = torch.rand(4)
        torch.manual_seed(7)  # both ranks now alike: only the checkpoint can tell them apart again
        state = manager.resume(*_fresh())
        assert state is not None and state.world_size == 2
        torch.save({"expected": expected_draw, "got": torch.rand(4)}, Path(folder) / f"draws{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_each_rank_resumes_its_own_generator(tmp_path):
    torch.multiprocessing.spawn(_two_rank_rng_round_trip, args=(str(tmp_path),), nprocs=2)
    draws = [torch.load(tmp_path / f"draws{r}.pt", weights_only=True) for r in range(2)]
    for d in draws:
        assert torch.equal(d["got"], d["expected"])
    assert not torch.equal(draws[0]["got"], draws[1]["got"])  # the ranks' streams differ: not one state twice
    ckpt = tmp_path / "checkpoints" / "ckpt_00000001"
    assert {k for k in saved_keys(ckpt) if k.startswith("rng.")} == {"rng.rank0.cpu", "rng.rank1.cpu"}
