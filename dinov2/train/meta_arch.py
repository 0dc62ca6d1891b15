"""Student / teacher self-distillation: what one training step computes.

The student (backbone + DINO head + iBOT head, the heads shared or separate) sees all crops in one
packed forward; the teacher, an EMA copy of the student that never receives gradients, sees the
global crops. Teacher head outputs are centred (softmax-centering or Sinkhorn-Knopp) into targets;
the student is trained with DINO (CLS), iBOT (masked patches) and KoLeo (CLS spread) losses.

Distillation (``dinov2.distill``) reuses this class with a frozen teacher that may differ in size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from dinov2.config import Config, HeadConfig, LossConfig
from dinov2.distributed.meta_init import local_shard
from dinov2.layers import DINOHead
from dinov2.losses import Centering, DINOLoss, IBOTPatchLoss, KoLeoLoss
from dinov2.models import DinoVisionTransformer, build_backbone
from dinov2.train.export import Export


def build_heads(embed_dim: int, dino: HeadConfig, ibot: HeadConfig | None) -> nn.ModuleDict:
    """The DINO head, and the iBOT head when ``ibot`` is given (None: the iBOT loss uses the DINO head)."""

    def head(c: HeadConfig) -> DINOHead:
        return DINOHead(embed_dim, c.out_dim, c.hidden_dim, c.bottleneck_dim, c.nlayers, mlp_init=c.mlp_init)

    heads = nn.ModuleDict({"dino_head": head(dino)})
    if ibot is not None:
        heads["ibot_head"] = head(ibot)
    return heads


class Network(nn.Module):
    """Backbone + heads: the unit that is trained (student), EMA-averaged or frozen (teacher)."""

    def __init__(self, backbone: DinoVisionTransformer, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = heads["dino_head"]
        self.ibot_head = heads["ibot_head"] if "ibot_head" in heads else None

    def head_logits(self, cls: Tensor, masked_patches: Tensor) -> tuple[Tensor, Tensor]:
        """DINO logits of ``cls`` and iBOT logits of ``masked_patches``; one head call when shared."""
        if self.ibot_head is None:
            logits = self.dino_head(torch.cat([cls, masked_patches]))
            # split, not two slices: its backward is one concatenation, not two zero-filled full-size grads
            dino, ibot = logits.split([cls.shape[0], masked_patches.shape[0]])
            return dino, ibot
        return self.dino_head(cls), self.ibot_head(masked_patches)


@dataclass
class StepOutput:
    loss: Tensor
    parts: dict[str, Tensor]  # detached loss terms for logging


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: Config, teacher: Network | None = None) -> None:
        super().__init__()
        loss_cfg: LossConfig = cfg.loss
        backbone = build_backbone(cfg.model)
        self.student = Network(backbone, build_heads(backbone.embed_dim, cfg.dino_head, cfg.ibot_head))
        if teacher is None:
            teacher = copy.deepcopy(self.student)
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        ibot_dim = cfg.ibot_loss_head().out_dim
        self.dino_center = Centering(
            cfg.dino_head.out_dim, loss_cfg.centering, loss_cfg.center_momentum, loss_cfg.sk_iterations
        )
        self.ibot_center = Centering(ibot_dim, loss_cfg.centering, loss_cfg.center_momentum, loss_cfg.sk_iterations)
        self.dino_loss = DINOLoss(loss_cfg.student_temp)
        self.ibot_loss = IBOTPatchLoss(loss_cfg.student_temp)
        self.koleo_loss = KoLeoLoss()
        self.loss_cfg = loss_cfg
        self.layerwise_decay = cfg.optim.layerwise_decay  # the optimizer's per-block lr decay for the students
        # the student's global crops get the iBOT mask tokens (distillation may see them unmasked)
        self.student_masks = True

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses stochastic depth
        return self

    # ------------------------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_targets(
        self, global_crops: Tensor, mask_index: Tensor, teacher_temp: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Centred target distributions: DINO ``(2, B, K)`` for the global views, iBOT ``(M, K)``, and the
        mean entropy of the DINO targets (collapse drives it to 0, no learning signal to log K)."""
        out = self.teacher.backbone(global_crops)
        cls, patch = out["cls"], out["patch"]
        masked = patch.flatten(0, 1)[mask_index]
        with torch.autocast(global_crops.device.type, enabled=False):  # fp32 logits before the sharp temperature
            dino_logits, ibot_logits = self.teacher.head_logits(cls.float(), masked.float())
        dino_logits = dino_logits.reshape(2, -1, dino_logits.shape[-1])
        dino_targets = self.dino_center(dino_logits, teacher_temp)
        ibot_targets = self.ibot_center(ibot_logits, teacher_temp)
        self.dino_center.update(dino_logits)  # the softmax centre's EMA; nothing under Sinkhorn-Knopp
        self.ibot_center.update(ibot_logits)
        for module in self.teacher.modules():  # FSDP2 roots stay unsharded after a no-grad forward
            if isinstance(module, FSDPModule):
                module.reshard()
        entropy = -(dino_targets * torch.log(dino_targets.clamp_min(1e-12))).sum(-1).mean()
        return dino_targets, ibot_targets, entropy

    # ------------------------------------------------------------------------------------ student
    def forward(self, batch: dict[str, Tensor], teacher_temp: float) -> StepOutput:
        """Losses of one step. ``batch``: ``global_crops`` (2B,…) view-major, ``local_crops`` (nB,…) or
        empty, ``masks`` (2B, N) bool, ``mask_indices`` (M,), ``mask_weights`` (M,)."""
        dino_targets, ibot_targets, entropy = self.teacher_targets(
            batch["global_crops"], batch["mask_indices"], teacher_temp
        )
        # one teacher forward serves every trained network (several students when distilling): their
        # losses are summed, their terms logged as "{name}/…" (the first without a prefix)
        loss, parts = None, {}
        for name, student in self.trained_networks().items():
            step = self.student_losses(student, batch, dino_targets, ibot_targets)
            loss = step.loss if loss is None else loss + step.loss
            prefix = "" if name == "student" else f"{name}/"
            parts.update({prefix + key: value for key, value in step.parts.items()})
        parts["teacher_entropy"] = entropy
        return StepOutput(loss, parts)

    def student_losses(
        self, student: Network, batch: dict[str, Tensor], dino_targets: Tensor, ibot_targets: Tensor
    ) -> StepOutput:
        """DINO + iBOT + KoLeo of ``student`` (all crops in one packed forward) against the targets."""
        global_crops = batch["global_crops"]
        local_crops = batch.get("local_crops")
        masks = batch["masks"]
        mask_index = batch["mask_indices"]
        n_global = global_crops.shape[0]
        batch_size = n_global // 2

        has_local = local_crops is not None and local_crops.numel() > 0
        crops = [global_crops, local_crops] if has_local else [global_crops]
        outs = student.backbone(crops, [masks if self.student_masks else None] + [None] * (len(crops) - 1))
        global_cls = outs[0]["cls"]
        cls = torch.cat([global_cls] + ([outs[1]["cls"]] if has_local else []))
        masked = outs[0]["patch"].flatten(0, 1)[mask_index]
        dino_logits, ibot_logits = student.head_logits(cls, masked)
        k = dino_logits.shape[-1]
        student_global, student_local = dino_logits.split([n_global, dino_logits.shape[0] - n_global])
        student_global = student_global.reshape(2, batch_size, k)
        student_local = student_local.reshape(-1, batch_size, k) if has_local else None

        parts: dict[str, Tensor] = {}
        cfg = self.loss_cfg
        loss = global_cls.new_zeros((), dtype=torch.float32)
        if cfg.dino_weight:
            parts["dino"] = self.dino_loss(student_global, dino_targets, student_local)
            loss = loss + cfg.dino_weight * parts["dino"]
        if cfg.ibot_weight and mask_index.numel() > 0:
            # normalised by all 2B global crops, masked or not, as the reference (dinov2/dinov3
            # ibot_patch_loss.py forward_masked; ssl_meta_arch.py's loss scales 2 * 1/2 cancel)
            parts["ibot"] = self.ibot_loss(ibot_logits, ibot_targets, batch["mask_weights"], n_global)
            loss = loss + cfg.ibot_weight * parts["ibot"]
        elif cfg.ibot_weight:
            # no masked patch in this rank's batch: a zero that keeps the iBOT head in the graph, so every
            # FSDP rank runs the same gradient collectives and logs the same terms
            parts["ibot"] = ibot_logits.sum() * 0.0
            loss = loss + parts["ibot"]
        if cfg.koleo_weight:
            parts["koleo"] = sum(self.koleo_loss(view) for view in global_cls.chunk(2))
            loss = loss + cfg.koleo_weight * parts["koleo"]
        parts = {name: value.detach() for name, value in parts.items()}
        parts["loss"] = loss.detach()
        return StepOutput(loss, parts)

    # ----------------------------------------------------------------------------------------- EMA
    def update_ema(self, momentum: float) -> None:
        """The run's EMA: teacher ← m · teacher + (1 − m) · student (distillation overrides it)."""
        ema_update(self.teacher, self.student, momentum)

    def networks(self) -> dict[str, Network]:
        """Every backbone+heads unit, for sharding: trained, EMA-averaged or frozen alike."""
        return {"student": self.student, "teacher": self.teacher}

    def trained_networks(self) -> dict[str, Network]:
        """The networks the optimizer updates; each is clipped on its own and logged as ``{name}/…``
        (the first, ``student``, without a prefix)."""
        return {"student": self.student}

    def exports(self) -> list[Export]:
        """What a finished run writes and evaluates, its main result first. Self-distillation: the EMA
        teacher."""
        return [Export("teacher", self.teacher.backbone)]

    def exported_backbone(self) -> DinoVisionTransformer:
        """The run's main result: the backbone of the first of :meth:`exports`."""
        return self.exports()[0].backbone

    def train_transform(self) -> None:
        """The per-image training transform: None, the loader's multi-crop augmentation."""
        return None


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target ← m · target + (1 − m) · source, parameter by parameter, on local shards under FSDP2."""
    dst = [local_shard(p) for p in target.parameters()]
    src = [local_shard(p) for p in source.parameters()]
    torch._foreach_mul_(dst, momentum)
    torch._foreach_add_(dst, src, alpha=1.0 - momentum)
