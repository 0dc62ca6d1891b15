"""Loading the frozen distillation teacher: from a training run's DCP checkpoint (shard by shard when the
run is sharded), or from backbone-only weights.

When ``distill.teacher_checkpoint`` names one of our runs (its output directory or a ``ckpt_*``
directory), the teacher network (backbone + heads, built from the run's ``config.yaml``) is
constructed on the meta device, sharded over the job's mesh exactly as ``parallelize`` shards a
teacher, allocated on the device, and filled by ``torch.distributed.checkpoint`` reading only the
``model.teacher.*`` entries — each rank reads the rows of its own shards, no rank ever holds the
full teacher. ``parallelize`` then leaves it as it is (already sharded).

Unsharded, :func:`load_teacher` reads the same entries whole (nothing else of the run is built). Backbone-
only weight files (our safetensors export, timm, HF) are read whole by :func:`load_teacher` on each rank's
host and sharded by ``parallelize`` (a transient host copy: those layouts are single files).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from dinov2.config import Config
from dinov2.distill.meta_arch import find_run_checkpoint, teacher_config, teacher_run_config
from dinov2.distributed.checkpoint_dir import quiet_single_process
from dinov2.distributed.meta_init import on_meta
from dinov2.distributed.parallelize import mixed_precision_policy, network_sharding, shard_network
from dinov2.interop import load_pretrained_backbone
from dinov2.models import build_backbone
from dinov2.train.meta_arch import Network, build_heads

logger = logging.getLogger(__name__)

TEACHER_PREFIX = "teacher."


def load_teacher(cfg: Config) -> Network:
    """The frozen teacher described by ``cfg.distill``, whole on this host (see ``dinov2.distill.meta_arch``)."""
    source = Path(cfg.distill.teacher_checkpoint)
    if not str(cfg.distill.teacher_checkpoint) or not source.exists():
        raise FileNotFoundError(
            f"distill.teacher_checkpoint='{cfg.distill.teacher_checkpoint}' does not exist "
            "(give a training run directory, a ckpt_* directory or a backbone weights file)"
        )
    run_ckpt = find_run_checkpoint(source) if source.is_dir() else None
    if run_ckpt is not None:
        return _load_run_teacher(cfg, run_ckpt, None, torch.device("cpu"))
    backbone = load_pretrained_backbone(source, layout=cfg.distill.teacher_format, model_cfg=teacher_config(cfg).model)
    generator_state = torch.get_rng_state()
    torch.manual_seed(cfg.distill.head_seed)
    heads = build_heads(backbone.embed_dim, cfg.dino_head, cfg.ibot_head)
    torch.set_rng_state(generator_state)
    seed = cfg.distill.head_seed
    logger.info("distillation teacher: backbone from %s, heads made (seed %d) and frozen", source, seed)
    teacher = Network(backbone, heads)
    teacher.requires_grad_(False)
    return teacher.eval()


def load_teacher_sharded(cfg: Config, mesh: DeviceMesh, device: torch.device) -> Network | None:
    """The frozen teacher, sharded over ``mesh`` and loaded shard by shard, when
    ``distill.teacher_checkpoint`` is a run of ours; None otherwise (the caller loads it whole)."""
    source = Path(cfg.distill.teacher_checkpoint)
    if not str(cfg.distill.teacher_checkpoint) or not source.is_dir():
        return None
    run_ckpt = find_run_checkpoint(source)
    if run_ckpt is None:
        return None
    return _load_run_teacher(cfg, run_ckpt, mesh, device)


def _load_run_teacher(cfg: Config, run_ckpt: Path, mesh: DeviceMesh | None, device: torch.device) -> Network:
    """The EMA teacher (backbone and heads) of run checkpoint ``run_ckpt``: built on the meta device from
    the run's configuration, sharded over ``mesh`` when given, allocated on ``device`` and filled by DCP
    from the ``model.teacher.*`` entries only (nothing else of the run is built or read)."""
    teacher_cfg = teacher_run_config(cfg, run_ckpt)

    def build() -> Network:
        backbone = build_backbone(teacher_cfg.model)
        heads = build_heads(backbone.embed_dim, teacher_cfg.dino_head, teacher_cfg.ibot_head)
        return Network(backbone, heads)

    teacher = on_meta(build)
    if mesh is not None:
        policy = mixed_precision_policy(cfg.distributed)
        shard_network(teacher, policy, mesh, **network_sharding(cfg.distributed, trained=False))
    teacher.to_empty(device=device)
    state = {TEACHER_PREFIX + k: v for k, v in get_model_state_dict(teacher).items()}
    with quiet_single_process():
        dcp.load({"model": state}, checkpoint_id=str(run_ckpt))  # in place (into this rank's shards)
    how = "shard by shard" if mesh is not None else "whole"
    logger.info("distillation teacher: backbone and heads from %s, loaded %s", run_ckpt, how)
    teacher.requires_grad_(False)
    return teacher.eval()
