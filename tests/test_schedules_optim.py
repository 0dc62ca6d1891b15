"""Schedules at chosen iterations (hand-computed) and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from dinov2.config import load_config
from dinov2.models import create_vit
from dinov2.train.meta_arch import Network, build_heads
from dinov2.train.optim import apply_schedule, build_optimizer, layer_id, param_groups
from dinov2.train.schedules import Schedules, cosine, scaled_lr, warmup_cosine


def test_cosine_and_warmup_values():
    assert cosine(0, 0, 100, 1.0, 0.0) == 1.0
    assert cosine(50, 0, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine(25, 0, 100, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(100, 0, 100, 1.0, 0.0) == 0.0 and cosine(150, 0, 100, 1.0, 0.0) == 0.0
    assert warmup_cosine(5, 110, 2.0, 0.0, 10) == pytest.approx(1.0)  # halfway through warm-up
    assert warmup_cosine(10, 110, 2.0, 0.0, 10) == pytest.approx(2.0)  # peak
    assert warmup_cosine(60, 110, 2.0, 0.0, 10) == pytest.approx(1.0)  # halfway through the cosine


def test_scaled_lr():
    assert scaled_lr(0.004, 1024, "sqrt") == pytest.approx(0.004)
    assert scaled_lr(0.004, 256, "sqrt") == pytest.approx(0.002)
    assert scaled_lr(0.004, 256, "linear") == pytest.approx(0.001)
    with pytest.raises(ValueError):
        scaled_lr(0.004, 256, "cubic")


def test_schedules_from_config_at_iterations():
    cfg = load_config(
        None,
        [
            "optim.epochs=10",
            "optim.epoch_length=100",
            "optim.base_lr=0.004",
            "optim.min_lr=0.0",
            "optim.warmup_epochs=1",
            "optim.weight_decay=0.04",
            "optim.weight_decay_end=0.2",
            "optim.momentum_teacher=0.992",
            "optim.freeze_last_layer_epochs=0.5",
            "loss.teacher_temp=0.07",
            "loss.warmup_teacher_temp=0.04",
            "loss.warmup_teacher_temp_epochs=3",
        ],
    )
    s = Schedules.from_config(cfg, global_batch=256, total_iterations=1000)
    peak = 0.004 * math.sqrt(256 / 1024)
    v0, v50, v100, v550, v999 = (s.at(i) for i in (0, 50, 100, 550, 999))
    assert v0.lr == 0.0 and v50.lr == pytest.approx(peak / 2) and v100.lr == pytest.approx(peak)
    assert v550.lr == pytest.approx(peak / 2)  # halfway through the cosine part (100 → 1000)
    assert v0.weight_decay == pytest.approx(0.04) and s.at(500).weight_decay == pytest.approx(0.12)
    assert v0.momentum == pytest.approx(0.992) and s.at(500).momentum == pytest.approx(0.996)
    assert v999.momentum == pytest.approx(1.0, abs=1e-6)
    assert v0.teacher_temp == pytest.approx(0.04) and s.at(150).teacher_temp == pytest.approx(0.055)
    assert s.at(300).teacher_temp == pytest.approx(0.07)
    assert v0.freeze_last_layer and s.at(49).freeze_last_layer and not v50.freeze_last_layer


def _network(depth=3):
    backbone = create_vit(
        "vit_small", img_size=16, patch_size=4, embed_dim=16, depth=depth, num_heads=2, num_register_tokens=1
    )
    cfg = load_config(None, ["dino_head.out_dim=8", "dino_head.hidden_dim=8", "dino_head.bottleneck_dim=4"])
    return Network(backbone, build_heads(16, cfg.dino_head, cfg.ibot_head, separate_ibot=False))


def test_layer_ids():
    assert layer_id("patch_embed.proj.weight", 12) == 0
    assert layer_id("cls_token", 12) == 0
    assert layer_id("blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("norm.weight", 12) == 13


def test_param_groups_decay_and_multipliers():
    net = _network(depth=3)
    groups = param_groups(net, depth=3, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)

    def group(name):
        return by_param[id(named[name])]

    # the reference's exemptions (dinov2 utils/param_groups.py): biases, norms, LayerScale gamma only
    no_decay = {n for n in named if n.endswith(".bias") or "norm" in n or ".gamma" in n}
    assert {"backbone.blocks.0.ls1.gamma", "backbone.blocks.0.norm1.weight", "backbone.norm.weight"} <= no_decay
    for name in named:
        assert group(name)["wd_multiplier"] == (0.0 if name in no_decay else 1.0), name
    for decay in (  # decayed by the reference (the old code exempted these)
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.register_tokens",
        "backbone.mask_token",
        "dino_head.last_layer.parametrizations.weight.original0",  # the reference's weight_g
        "backbone.blocks.1.attn.qkv.weight",
        "backbone.patch_embed.proj.weight",
        "dino_head.mlp.0.weight",
    ):
        assert group(decay)["wd_multiplier"] == 1.0, decay
    # layer-wise decay 0.5 over depth 3: embeddings 0.5^4, block i 0.5^(3-i), head 1; patch embed × 0.2
    assert group("backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.5**4 * 0.2)
    assert group("backbone.pos_embed")["lr_multiplier"] == pytest.approx(0.5**4)
    assert group("backbone.blocks.0.attn.qkv.weight")["lr_multiplier"] == pytest.approx(0.5**3)
    assert group("backbone.blocks.2.attn.qkv.weight")["lr_multiplier"] == pytest.approx(0.5)
    assert group("dino_head.mlp.0.weight")["lr_multiplier"] == 1.0
    assert group("dino_head.last_layer.parametrizations.weight.original1")["is_last_layer"]

    opt = build_optimizer(groups, (0.9, 0.999), fused=True, device=torch.device("cpu"))
    apply_schedule(opt, lr=0.1, weight_decay=0.04)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1 * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    apply_schedule(opt, lr=0.1, weight_decay=0.04, last_layer_lr=0.0)  # the reference's last-layer freeze
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else pytest.approx(0.1 * g["lr_multiplier"]))


def test_frozen_last_layer_keeps_its_weights_but_adam_and_the_clip_norm_see_it():
    """The reference freezes the prototype layer by a zero lr for its group (dinov2 train/train.py
    last_layer_lr_schedule): its weights stay, its gradients still enter Adam's moments and the DINO
    head's clip norm (the old code dropped them: no Adam state, a smaller norm)."""
    from tiny_config import TINY

    from dinov2.distributed.env import DistEnv
    from dinov2.launch.run import build_training
    from dinov2.train.clipping import clip_gradients
    from dinov2.train.schedules import ScheduleValues
    from dinov2.train.trainer import build_loader

    cfg = load_config("train/demo", TINY + ["optim.clip_grad=0"])
    env = DistEnv()
    training = build_training(cfg, env, torch.device("cpu"))
    batch = next(iter(build_loader(cfg, env, torch.device("cpu"), 0)))
    head = training.model.student.dino_head
    last = list(head.last_layer.parameters())
    before = [p.detach().clone() for p in last]
    # the norm the step should log: the head's gradient including its prototype layer
    loss = training.model(batch, teacher_temp=0.07).loss
    loss.backward()
    expected = clip_gradients(training.model.student, 0.0)["dino_head"]
    training.optimizer.zero_grad(set_to_none=True)
    frozen = ScheduleValues(lr=1e-2, weight_decay=0.04, momentum=0.99, teacher_temp=0.07, freeze_last_layer=True)
    parts = training.step(batch, frozen)
    assert parts["grad_norm/dino_head"].item() == pytest.approx(expected.item(), rel=1e-5)
    for p, p0 in zip(last, before, strict=True):
        assert torch.equal(p.detach(), p0)  # lr 0: no update, no weight decay
        assert training.optimizer.state[p]["exp_avg"].abs().sum() > 0  # Adam saw the gradient
    mlp = head.mlp[0].weight
    mlp_before = mlp.detach().clone()
    training.step(batch, frozen)
    assert not torch.equal(mlp.detach(), mlp_before)  # the rest of the head trains


def test_dino_head_init_is_the_reference_trunc_normal():
    """dinov2 layers/dino_head.py: MLP weights trunc_normal(std=0.02) (cut at ±2 absolute), zero biases;
    the prototypes' weight-norm g = 1. ``fan_in`` (the CPU recipes) scales the std by 1/sqrt(fan_in)."""
    from dinov2.layers import DINOHead

    torch.manual_seed(0)
    head = DINOHead(384, 512, hidden_dim=2048, bottleneck_dim=256, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    for m in linears:
        # a normal(0, 0.02) cut at ±2 (i.e. ±100 std: nothing is cut) has std 0.02
        assert m.weight.std().item() == pytest.approx(0.02, rel=0.02)
        assert m.weight.abs().max().item() < 0.2 and torch.all(m.bias == 0)
    assert torch.all(head.last_layer.parametrizations.weight.original0 == 1)
    v = head.last_layer.parametrizations.weight.original1  # nn.Linear's default: U(-1/sqrt(256), 1/sqrt(256))
    assert v.abs().max().item() <= 1 / 16 and v.std().item() == pytest.approx(1 / 16 / math.sqrt(3), rel=0.02)
    fan_in = DINOHead(384, 512, hidden_dim=2048, bottleneck_dim=256, nlayers=3, mlp_init="fan_in")
    assert fan_in.mlp[0].weight.std().item() == pytest.approx(384**-0.5 * 0.88, rel=0.03)  # cut at 2 std
    cfg = load_config(None, [])
    assert cfg.dino_head.mlp_init == cfg.ibot_head.mlp_init == "trunc_normal"
    with pytest.raises(ValueError, match="mlp_init"):
        DINOHead(8, 8, mlp_init="xavier")


def test_distillation_student_ema_momentum_warm_up_option():
    """``distill.student_ema_warmup=true`` (short CPU runs): min(m, (1 + t) / (10 + t)) on top of the
    schedule, here a constant 0.999."""
    cfg = load_config(
        None,
        [
            "distill.enabled=true",
            "distill.student_ema_momentum=0.999",
            "distill.final_student_ema_momentum=0.999",
            "distill.student_ema_warmup=true",
        ],
    )
    s = Schedules.from_config(cfg, global_batch=256, total_iterations=20_000)
    assert s.at(0).momentum == pytest.approx(0.1) and s.at(8).momentum == pytest.approx(0.5)
    assert s.at(80).momentum == pytest.approx(0.9) and s.at(890).momentum == pytest.approx(0.99)
    assert s.at(8990).momentum == pytest.approx(0.999) and s.at(19_999).momentum == pytest.approx(0.999)
    # self-distillation keeps the DINO teacher schedule (no warm-up)
    ssl = Schedules.from_config(load_config(None, ["optim.momentum_teacher=0.992"]), 256, 1000)
    assert ssl.at(0).momentum == pytest.approx(0.992)
