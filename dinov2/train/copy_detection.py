"""A copy detector trained on the pool itself: SSCD-style instance discrimination under copy augmentations.

``train.objective=copy_detection`` (``configs/train/copy_detection.yaml``) makes the trainer optimise
this meta-architecture instead of DINO's: every image of a batch arrives as two views made by
:class:`~dinov2.data.copy_augmentations.CopyViews` (crops, flips, JPEG, colour, rotation, overlays),
and the backbone's descriptor — the final-norm CLS token, exactly the feature ``dinov2-curate embed``
reads — is trained with :class:`~dinov2.losses.copy_detection.CopyDetectionLoss`: the two views of an
image must be nearer to each other than to any other image of the batch, and unrelated images are
spread apart. No labels, no teacher, no heads: what is learned is instance-level similarity, the thing a
dedup threshold needs, where DINO learns semantic similarity (two different ships look alike to it).

Everything else is the trainer's: data (any ``data.dataset``, positions seeded and resumable),
AdamW with the lr / weight-decay schedules, checkpoints with exact resume, FSDP2 sharding, metrics.
The finished run exports ``student_backbone.safetensors`` next to its ``config.yaml``; ``dinov2-curate
embed embed.model.path=RUN_DIR`` reads it like any run of ours.

The interface the trainer uses is the one of :class:`~dinov2.train.meta_arch.SSLMetaArch`:
``forward(batch, teacher_temp) -> StepOutput``, ``trained_networks`` / ``networks`` (sharding,
optimizer, clipping), ``update_ema`` (nothing to average here), ``exports`` and ``train_transform``.
"""

from __future__ import annotations

from torch import Tensor, nn

from dinov2.config import Config, ConfigError
from dinov2.data.copy_augmentations import CopyViews
from dinov2.distributed.meta_init import on_meta
from dinov2.losses.copy_detection import CopyDetectionLoss
from dinov2.models import DinoVisionTransformer, build_backbone
from dinov2.train.export import Export
from dinov2.train.meta_arch import StepOutput
from dinov2.train.model_factory import ModelFactory


class DescriptorNetwork(nn.Module):
    """The trained unit: a backbone whose final-norm CLS token is the copy descriptor."""

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)["cls"].contiguous()  # a copy, not a view of the tokens (FSDP2 hooks)


class CopyDetectionMetaArch(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        check_copy_detection_config(cfg)
        self.cfg = cfg
        self.layerwise_decay = cfg.optim.layerwise_decay
        self.student = DescriptorNetwork(build_backbone(cfg.model))
        self.loss = CopyDetectionLoss(cfg.copy_detection.temperature, cfg.copy_detection.entropy_weight)

    def forward(self, batch: dict[str, Tensor], teacher_temp: float | None = None) -> StepOutput:
        """Loss of one step. ``batch["global_crops"]``: ``(2B, 3, S, S)``, view-major (rows ``b`` and
        ``B + b`` are the two views of image ``b``); ``teacher_temp`` is accepted and unused."""
        views = batch["global_crops"]
        descriptors = self.student(views)
        view0, view1 = descriptors.chunk(2)
        loss, parts = self.loss(view0, view1)
        parts["loss"] = loss.detach()
        return StepOutput(loss, parts)

    def update_ema(self, momentum: float) -> None:
        """Nothing to average: SSCD trains one network and exports it."""

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def trained_networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def exports(self) -> list[Export]:
        return [Export("student", self.student.backbone)]

    def exported_backbone(self) -> DinoVisionTransformer:
        return self.student.backbone

    def train_transform(self) -> CopyViews:
        """The data pipeline's per-image transform: two copy-augmented views at the global crop size."""
        crops = self.cfg.data.crops
        return CopyViews(self.cfg.copy_detection, crops.global_crops_size, crops.mean, crops.std)


class CopyDetectionFactory(ModelFactory):
    """What ``train.objective=copy_detection`` trains (``dinov2.train.model_factory``)."""

    def skeleton(self, cfg: Config) -> CopyDetectionMetaArch:
        return on_meta(lambda: CopyDetectionMetaArch(cfg))


def check_copy_detection_config(cfg: Config) -> None:
    """One-line :class:`ConfigError` for settings the copy-detection objective cannot honour."""
    if cfg.distill.enabled:
        raise ConfigError("train.objective=copy_detection trains its own network: set distill.enabled=false")
    if cfg.data.pipeline != "cpu":
        raise ConfigError("train.objective=copy_detection makes its views with PIL: set data.pipeline=cpu")
    if cfg.data.batch_size_per_gpu < 2:
        raise ConfigError(
            "train.objective=copy_detection needs data.batch_size_per_gpu >= 2 (other images are the negatives)"
        )
    if cfg.copy_detection.temperature <= 0:
        raise ConfigError(f"copy_detection.temperature must be positive, got {cfg.copy_detection.temperature}")
    if not cfg.copy_detection.kinds:
        raise ConfigError("copy_detection.kinds is empty: list the transforms a training view may get")
