"""What the training loop trains, handed to it: a :class:`ModelFactory`.

The loop (``dinov2.train.trainer``) knows one contract — a meta-architecture with ``networks()``,
``trained_networks()``, ``forward(batch, teacher_temp)``, ``update_ema``, ``train_transform()`` and
``exports()`` — and is given the factory that builds it, as torchtitan's trainer is given a model from
its train spec. This module holds the contract and the self-supervised factory; the copy detector
(``dinov2.train.copy_detection``) and distillation (``dinov2.distill``) bring their own, and
``dinov2.launch.run.model_factory`` is the one place a configuration picks one.

A factory builds on the meta device (shapes, no storage): ``dinov2.distributed`` shards first and
materialises after. ``build`` may read files (a distillation teacher's weights, sharded over ``mesh``
when the run is sharded); ``skeleton`` never does — it is what the memory plan (``--plan``) and
``--init-from``'s shape check measure.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from dinov2.config import Config
from dinov2.distributed.meta_init import on_meta
from dinov2.train.meta_arch import SSLMetaArch


class ModelFactory:
    """Builds the self-supervised meta-architecture (student, EMA teacher, heads, DINO + iBOT + KoLeo)."""

    def skeleton(self, cfg: Config) -> SSLMetaArch:
        """The meta-architecture of ``cfg`` on the meta device, without reading any file."""
        return on_meta(lambda: SSLMetaArch(cfg))

    def build(self, cfg: Config, mesh: DeviceMesh | None = None, device: torch.device | None = None) -> SSLMetaArch:
        """The meta-architecture the loop trains, on the meta device except for what is loaded (a frozen
        teacher), which may already be sharded over ``mesh`` on ``device``."""
        return self.skeleton(cfg)
