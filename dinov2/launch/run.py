"""A run of a configuration: the one place the configuration picks what the loop trains.

``train.objective`` and ``distill.enabled`` choose a :class:`~dinov2.train.model_factory.ModelFactory`
(self-supervised, copy detection, distillation); the loop (``dinov2.train.trainer``) is handed it and
knows nothing of the choice. Entry points (``dinov2-train``, ``dinov2-distill``, ``dinov2-submit``), the
benchmarks and the tests go through the functions here.
"""

from __future__ import annotations

import torch

from dinov2.config import Config
from dinov2.distill.factory import DistillFactory
from dinov2.distributed.env import DistEnv
from dinov2.distributed.meta_init import materialize
from dinov2.distributed.plan import NetworkShapes, network_shapes
from dinov2.distributed.stop import StopRequest
from dinov2.train import trainer
from dinov2.train.copy_detection import CopyDetectionFactory
from dinov2.train.meta_arch import SSLMetaArch
from dinov2.train.model_factory import ModelFactory


def model_factory(cfg: Config) -> ModelFactory:
    """The factory of what ``cfg`` trains."""
    if cfg.train.objective == "copy_detection":
        return CopyDetectionFactory()
    if cfg.distill.enabled:
        return DistillFactory()
    return ModelFactory()


def construct_meta_arch(cfg: Config) -> SSLMetaArch:
    """The meta-architecture of ``cfg`` on the meta device (a distillation teacher loaded whole)."""
    return model_factory(cfg).build(cfg)


def plan_shapes(cfg: Config) -> list[NetworkShapes]:
    """The parameter shapes of every network of ``cfg`` (meta device, no file read): ``--plan``'s input."""
    return network_shapes(model_factory(cfg).skeleton(cfg))


def build_meta_arch(cfg: Config, device: torch.device) -> SSLMetaArch:
    """The meta-architecture of ``cfg``, unsharded on ``device``, with the run's initial weights (keyed by
    ``train.seed``: the same as every rank of a sharded run starts from, ``dinov2.layers.init``)."""
    model = construct_meta_arch(cfg)
    materialize(model, device, cfg.train.seed)
    return model


def build_training(cfg: Config, env: DistEnv, device: torch.device) -> trainer.Training:
    """:func:`dinov2.train.trainer.build_training` with the factory ``cfg`` picks (what the benchmarks time)."""
    return trainer.build_training(cfg, env, device, model_factory(cfg))


def train(cfg: Config, stop: StopRequest | None = None) -> trainer.TrainResult:
    """Train what ``cfg`` describes (:func:`dinov2.train.trainer.train`)."""
    return trainer.train(cfg, model_factory(cfg), stop)
