"""A frozen distillation teacher loaded shard by shard from a training run's DCP checkpoint.

When ``distill.teacher_checkpoint`` names one of our runs (its output directory or a ``ckpt_*``
directory), the teacher network (backbone + heads, built from the run's ``config.yaml``) is
constructed on the meta device, sharded over the job's mesh exactly as ``parallelize`` shards a
teacher, allocated on the device, and filled by ``torch.distributed.checkpoint`` reading only the
``model.teacher.*`` entries — each rank reads the rows of its own shards, no rank ever holds the
full teacher. ``parallelize`` then leaves it as it is (already sharded).

Backbone-only weight files (our safetensors export, timm, HF) are read whole by
``dinov2.distill.meta_arch.load_teacher`` on each rank's host and sharded by ``parallelize`` (a
transient host copy of the backbone: those layouts are single files, not sharded checkpoints).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from dinov2.config import Config
from dinov2.distill.meta_arch import find_run_checkpoint, teacher_run_config
from dinov2.distributed.meta_init import on_meta
from dinov2.distributed.parallelize import mixed_precision_policy, network_sharding, shard_network
from dinov2.models import build_backbone
from dinov2.train.meta_arch import Network, build_heads

logger = logging.getLogger(__name__)

TEACHER_PREFIX = "teacher."


def load_teacher_sharded(cfg: Config, mesh: DeviceMesh, device: torch.device):
    """The frozen teacher, sharded over ``mesh`` and loaded shard by shard, when
    ``distill.teacher_checkpoint`` is a run of ours; None otherwise (the caller loads it whole)."""
    source = Path(cfg.distill.teacher_checkpoint)
    if not str(cfg.distill.teacher_checkpoint) or not source.is_dir():
        return None
    run_ckpt = find_run_checkpoint(source)
    if run_ckpt is None:
        return None
    teacher_cfg = teacher_run_config(cfg, run_ckpt)

    def build() -> Network:
        backbone = build_backbone(teacher_cfg.model)
        heads = build_heads(backbone.embed_dim, teacher_cfg.dino_head, teacher_cfg.ibot_head)
        return Network(backbone, heads)

    teacher = on_meta(build)
    policy = mixed_precision_policy(cfg.distributed)
    shard_network(teacher, policy, mesh, **network_sharding(cfg.distributed, trained=False))
    teacher.to_empty(device=device)
    state = {TEACHER_PREFIX + k: v for k, v in get_model_state_dict(teacher).items()}
    dcp.load({"model": state}, checkpoint_id=str(run_ckpt))  # in place, into this rank's shards
    logger.info("distillation teacher: backbone and heads from %s, loaded shard by shard", run_ckpt)
    teacher.requires_grad_(False)
    return teacher.eval()
