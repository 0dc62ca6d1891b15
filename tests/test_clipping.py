"""Gradient clipping per sub-module (the reference) or global: norms against hand computation, the heads'
step unaffected by a backbone spike, the norms logged by a training step, and FSDP2 DTensor gradients."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_config import TINY

from dinov2.config import load_config
from dinov2.models import create_vit
from dinov2.train.clipping import clip_gradients, clipped_modules
from dinov2.train.meta_arch import Network, build_heads


def _network(separate_ibot: bool = True) -> Network:
    torch.manual_seed(0)
    backbone = create_vit("vit_small", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    cfg = load_config(
        None,
        [f"{h}.{k}={v}" for h in ("dino_head", "ibot_head") for k, v in (("out_dim", 8), ("hidden_dim", 8))]
        + ["dino_head.bottleneck_dim=4", "ibot_head.bottleneck_dim=4"],
    )
    return Network(backbone, build_heads(16, cfg.dino_head, cfg.ibot_head, separate_ibot=separate_ibot))


def _set_grads(network: Network, values: dict[str, float]) -> dict[str, float]:
    """Every gradient of sub-module ``name`` filled with ``values[name]``; returns the hand-computed norms
    ``value * sqrt(number of elements)``."""
    norms = {}
    for name, module in clipped_modules(network).items():
        numel = 0
        for p in module.parameters():
            p.grad = torch.full_like(p, values[name])
            numel += p.numel()
        norms[name] = abs(values[name]) * math.sqrt(numel)
    return norms


def _norm(module: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in module.parameters()))


def test_clipped_modules_are_the_reference_units():
    assert list(clipped_modules(_network(separate_ibot=True))) == ["backbone", "dino_head", "ibot_head"]
    assert list(clipped_modules(_network(separate_ibot=False))) == ["backbone", "dino_head"]


def test_per_module_norms_and_clipping_hand_computed():
    network = _network()
    expected = _set_grads(network, {"backbone": 2.0, "dino_head": 0.01, "ibot_head": -0.5})
    norms = clip_gradients(network, max_norm=3.0, mode="per_module")
    for name, value in expected.items():
        assert norms[name].item() == pytest.approx(value, rel=1e-6), name
    assert norms["total"].item() == pytest.approx(math.sqrt(sum(v * v for v in expected.values())), rel=1e-6)
    modules = clipped_modules(network)
    assert expected["backbone"] > 3.0 and _norm(modules["backbone"]) == pytest.approx(3.0, rel=1e-5)
    assert expected["ibot_head"] > 3.0 and _norm(modules["ibot_head"]) == pytest.approx(3.0, rel=1e-5)
    # under the limit: untouched, bit for bit
    assert all(torch.equal(p.grad, torch.full_like(p, 0.01)) for p in modules["dino_head"].parameters())


def test_backbone_spike_does_not_shrink_the_head_step():
    """A backbone gradient of norm ~700 next to a DINO-head gradient of norm ~0.5 (the ViT-S/14 figures at
    initialisation): per module the head keeps its gradient; one global norm would divide it by ~230."""
    per_module, global_ = _network(separate_ibot=False), _network(separate_ibot=False)
    for network in (per_module, global_):
        n_backbone = sum(p.numel() for p in network.backbone.parameters())
        n_head = sum(p.numel() for p in network.dino_head.parameters())
        expected = _set_grads(
            network, {"backbone": 700.0 / math.sqrt(n_backbone), "dino_head": 0.5 / math.sqrt(n_head)}
        )
    clip_gradients(per_module, max_norm=3.0, mode="per_module")
    assert _norm(per_module.dino_head) == pytest.approx(expected["dino_head"], rel=1e-6)
    assert _norm(per_module.backbone) == pytest.approx(3.0, rel=1e-5)
    clip_gradients(global_, max_norm=3.0, mode="global")
    total = math.hypot(expected["backbone"], expected["dino_head"])
    assert _norm(global_.dino_head) == pytest.approx(expected["dino_head"] * 3.0 / total, rel=1e-5)
    assert math.hypot(_norm(global_.backbone), _norm(global_.dino_head)) == pytest.approx(3.0, rel=1e-5)


def test_zero_max_norm_measures_only():
    network = _network()
    _set_grads(network, {"backbone": 5.0, "dino_head": 5.0, "ibot_head": 5.0})
    clip_gradients(network, max_norm=0.0)
    assert all(torch.equal(p.grad, torch.full_like(p, 5.0)) for p in network.parameters())
    with pytest.raises(ValueError, match="clip mode"):
        clip_gradients(network, 3.0, mode="sideways")


def test_training_step_logs_each_module_norm_and_clips_each():
    """The trainer's step reports ``grad_norm/{backbone,dino_head,ibot_head}`` and their total, and each
    sub-module is clipped on its own (the update of a sub-module over the clip limit equals the update
    from its gradient scaled to the limit)."""
    from dinov2.distributed.env import DistEnv
    from dinov2.launch.run import build_training
    from dinov2.train.schedules import ScheduleValues
    from dinov2.train.trainer import build_loader

    cfg = load_config("train/demo", TINY + ["loss.ibot_separate_head=true", "optim.clip_grad=0.01"])
    env = DistEnv()
    training = build_training(cfg, env, torch.device("cpu"))
    batch = next(iter(build_loader(cfg, env, torch.device("cpu"), 0)))
    values = ScheduleValues(lr=1e-3, weight_decay=0.0, momentum=0.99, teacher_temp=0.07, freeze_last_layer=False)
    parts = training.step(batch, values)
    module_norms = [parts[f"grad_norm/{name}"].item() for name in ("backbone", "dino_head", "ibot_head")]
    assert all(n > 0.01 for n in module_norms)  # every unit over the limit: each clipped
    assert parts["grad_norm"].item() == pytest.approx(math.sqrt(sum(n * n for n in module_norms)), rel=1e-5)


def test_fsdp_dtensor_gradients_give_the_plain_norms():
    """FSDP2 (world size 1, gloo, DTensor gradients): the same per-module norms and clipped gradients as
    the plain network."""
    from dinov2.distributed.env import distributed_session
    from dinov2.distributed.parallelize import mixed_precision_policy, shard_network

    cfg = load_config("train/demo", TINY + ["distributed.param_dtype=fp32", "distributed.fsdp=true"])
    plain = _network()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)

    def backward(network):
        cls = network.backbone(x)["cls"].clone()
        (network.dino_head(cls).square().sum() + 100 * network.ibot_head(cls).sum()).backward()

    backward(plain)
    norms = clip_gradients(plain, max_norm=1.0)
    with distributed_session("gloo", always=True):
        sharded = _network()
        sharded.load_state_dict(state)

        shard_network(sharded, mixed_precision_policy(cfg.distributed))
        backward(sharded)
        sharded_norms = clip_gradients(sharded, max_norm=1.0)
        grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.grad is not None}
    for name in ("backbone", "dino_head", "ibot_head", "total"):
        torch.testing.assert_close(sharded_norms[name], norms[name], rtol=1e-5, atol=0, msg=name)
    assert norms["ibot_head"] > 1.0  # clipping was active
    assert grads.keys() == {n for n, p in plain.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)


def _two_rank_worker(rank, world, init_file, out_dir):
    """Rank ``rank`` of a 2-rank gloo group: the FSDP2-sharded network, backward on its half of the batch,
    per-module clipping; saves the norms and the gathered clipped gradients."""
    import os

    import torch.distributed as dist

    from dinov2.distributed.parallelize import mixed_precision_policy, shard_network

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = load_config("train/demo", ["distributed.param_dtype=fp32"])
        network = _network()
        shard_network(network, mixed_precision_policy(cfg.distributed))
        x = _two_rank_batch()[4 * rank : 4 * rank + 4]
        _two_rank_loss(network, x).backward()  # FSDP2 averages the gradients over the ranks
        norms = clip_gradients(network, max_norm=1.0)
        grads = {n: p.grad.full_tensor() for n, p in network.named_parameters() if p.grad is not None}
        torch.save({"norms": norms, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _two_rank_batch() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _two_rank_loss(network: Network, x: torch.Tensor) -> torch.Tensor:
    cls = network.backbone(x)["cls"].clone()
    return network.dino_head(cls).square().mean() + 100 * network.ibot_head(cls).mean()


@pytest.mark.slow  # two spawned processes: ~15 s of CPU, over a minute on a loaded 2-core machine
def test_two_rank_fsdp_clipping_equals_one_process(tmp_path):
    """Two gloo ranks, FSDP2 shards over both: every rank gets the norms and clipped gradients of one
    process on the whole batch (the norms are reduced over the ranks' shards before scaling)."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    plain = _network()
    _two_rank_loss(plain, _two_rank_batch()).backward()
    norms = clip_gradients(plain, max_norm=1.0)
    assert norms["ibot_head"] > 1.0 and norms["backbone"] > 1.0  # clipping active on two units
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, norm in norms.items():
            torch.testing.assert_close(got["norms"][name], norm, rtol=1e-5, atol=0, msg=f"rank {rank} {name}")
        for name, grad in got["grads"].items():
            torch.testing.assert_close(grad, plain.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)
