"""What a distillation run trains (``distill.enabled=true``): the :class:`~dinov2.train.model_factory.ModelFactory`
the loop is handed for it.

``build`` loads the frozen teacher before the students are made on the meta device: shard by shard over
the job's mesh when the teacher is a run of ours and the run is sharded
(:func:`~dinov2.distill.teacher_load.load_teacher_sharded`), otherwise whole on the host
(:func:`~dinov2.distill.teacher_load.load_teacher`). ``skeleton`` reads no file: the teacher is
``distill.teacher_model`` with the student's head sizes, which is what the memory plan needs.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from dinov2.config import Config
from dinov2.distill.meta_arch import DistillMetaArch, teacher_config
from dinov2.distill.teacher_load import load_teacher, load_teacher_sharded
from dinov2.distributed.meta_init import on_meta
from dinov2.models import build_backbone
from dinov2.train.meta_arch import Network, build_heads
from dinov2.train.model_factory import ModelFactory


class DistillFactory(ModelFactory):
    def skeleton(self, cfg: Config) -> DistillMetaArch:
        def build() -> DistillMetaArch:
            backbone = build_backbone(teacher_config(cfg).model)
            heads = build_heads(backbone.embed_dim, cfg.dino_head, cfg.ibot_head)
            return DistillMetaArch(cfg, Network(backbone, heads))

        return on_meta(build)

    def build(self, cfg: Config, mesh: DeviceMesh | None = None, device: torch.device | None = None) -> DistillMetaArch:
        teacher = None
        if mesh is not None:
            teacher = load_teacher_sharded(cfg, mesh, device)  # None: not a run of ours, read it whole
        if teacher is None:
            teacher = load_teacher(cfg)
        return on_meta(lambda: DistillMetaArch(cfg, teacher))
