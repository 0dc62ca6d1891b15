"""Per-iteration schedules: learning rate, weight decay, EMA momentum, teacher temperature and the
prototype-layer freeze. All are pure functions of the iteration, so resuming needs only the iteration.

The EMA momentum is that of the network the run averages: the teacher when self-distilling (cosine
from ``optim.momentum_teacher`` to ``optim.final_momentum_teacher``), the students' EMAs when
distilling from a frozen teacher (cosine from ``distill.student_ema_momentum`` to
``distill.final_student_ema_momentum``, dinov3's; with ``distill.student_ema_warmup`` also warmed up by
:func:`ema_warmup`, so that the exported EMA of a short run is not mostly its random initialisation).

Distillation follows dinov3's recipe (``dinov3/configs/train/dinov3_vitl16_lvd1689m_distilled.yaml``,
``schedules``): teacher temperature constant (``distill.teacher_temp_warmup``), weight decay constant
(``distill.cosine_weight_decay``), no prototype-layer freeze (``distill.freeze_last_layer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(it: int, start_it: int, end_it: int, start: float, end: float) -> float:
    """Cosine from ``start`` at ``start_it`` to ``end`` at ``end_it`` (constant ``end`` after)."""
    if end_it <= start_it or it >= end_it:
        return end
    progress = (max(it, start_it) - start_it) / (end_it - start_it)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(it: int, total: int, peak: float, final: float, warmup: int, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``peak`` over ``warmup`` iterations, then cosine to ``final``."""
    if it < warmup:
        return warmup_start + (peak - warmup_start) * it / warmup
    return cosine(it, warmup, total, peak, final)


def linear_warmup(it: int, warmup: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup`` iterations, then constant ``end``."""
    if warmup <= 0 or it >= warmup:
        return end
    return start + (end - start) * it / warmup


def ema_warmup(it: int, momentum: float) -> float:
    """``min(momentum, (1 + it) / (10 + it))``: an EMA that starts by following its network closely
    (0.1 at the first step, 0.5 at iteration 8, 0.9 at 80) and reaches ``momentum`` after
    ``(10 m − 1) / (1 − m)`` iterations (8,990 for 0.999)."""
    return min(momentum, (1.0 + it) / (10.0 + it))


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """``base_lr`` is for a total batch of 1024; ``sqrt`` (DINOv2) or ``linear`` scaling, or none."""
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "linear":
        return base_lr * global_batch / 1024
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown optim.lr_scaling '{rule}' (expected sqrt, linear or none)")


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    weight_decay: float
    momentum: float  # of the EMA the run keeps (see the module docstring)
    teacher_temp: float
    freeze_last_layer: bool


@dataclass(frozen=True)
class Schedules:
    total_iterations: int
    peak_lr: float
    min_lr: float
    warmup_iterations: int
    weight_decay: float
    weight_decay_end: float
    momentum: float
    final_momentum: float
    teacher_temp: float
    warmup_teacher_temp: float
    teacher_temp_warmup_iterations: int
    freeze_last_layer_iterations: int
    warmup_momentum: bool = False  # apply ema_warmup to the momentum (distillation's student EMAs)

    @classmethod
    def from_config(cls, cfg, global_batch: int, total_iterations: int) -> Schedules:
        """From the ``optim`` and ``loss`` sections of a :class:`dinov2.config.Config`."""
        o, loss, d = cfg.optim, cfg.loss, cfg.distill
        per_epoch = o.epoch_length
        distill = d.enabled
        temp_warmup = not distill or d.teacher_temp_warmup
        return cls(
            total_iterations=total_iterations,
            peak_lr=scaled_lr(o.base_lr, global_batch, o.lr_scaling),
            min_lr=o.min_lr,
            warmup_iterations=round(o.warmup_epochs * per_epoch),
            weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end if not distill or d.cosine_weight_decay else o.weight_decay,
            momentum=d.student_ema_momentum if distill else o.momentum_teacher,
            final_momentum=d.final_student_ema_momentum if distill else o.final_momentum_teacher,
            teacher_temp=loss.teacher_temp,
            warmup_teacher_temp=loss.warmup_teacher_temp if temp_warmup else loss.teacher_temp,
            teacher_temp_warmup_iterations=round(loss.warmup_teacher_temp_epochs * per_epoch) if temp_warmup else 0,
            freeze_last_layer_iterations=(
                round(o.freeze_last_layer_epochs * per_epoch) if not distill or d.freeze_last_layer else 0
            ),
            warmup_momentum=distill and d.student_ema_warmup,
        )

    def at(self, it: int) -> ScheduleValues:
        total = self.total_iterations
        momentum = cosine(it, 0, total, self.momentum, self.final_momentum)
        return ScheduleValues(
            lr=warmup_cosine(it, total, self.peak_lr, self.min_lr, self.warmup_iterations),
            weight_decay=cosine(it, 0, total, self.weight_decay, self.weight_decay_end),
            momentum=ema_warmup(it, momentum) if self.warmup_momentum else momentum,
            teacher_temp=linear_warmup(
                it, self.teacher_temp_warmup_iterations, self.warmup_teacher_temp, self.teacher_temp
            ),
            freeze_last_layer=it < self.freeze_last_layer_iterations,
        )
