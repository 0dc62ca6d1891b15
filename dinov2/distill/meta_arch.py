"""Distillation: train a student against a frozen teacher with the self-supervised losses.

The teacher (backbone + DINO head [+ iBOT head]) is loaded once and never changes: no gradients, no
EMA, eval mode. The student is trained with exactly the DINO + iBOT + KoLeo losses of
:class:`~dinov2.train.meta_arch.SSLMetaArch` against the teacher's centred outputs (same code, the
teacher is simply passed in), and an EMA of the student is kept and exported as the final model.

The recipe's defaults are dinov3's distillation (``distill.*`` in ``dinov2/config.py``, docs/PARITY.md):
the student sees its global crops unmasked (the iBOT loss still compares the drawn patch positions),
constant teacher temperature and weight decay, no prototype-layer freeze, layer-wise lr decay 0.99,
and the students' EMA on a cosine from 0.994 to 1.

Where the teacher comes from (``distill.teacher_checkpoint``):

- a training run of ours (its output directory or one ``ckpt_*`` directory): the EMA teacher's
  backbone **and heads** are restored from the DCP checkpoint;
- backbone-only weights (our ``*.safetensors`` export, timm ``vit_*_patch14_dinov2`` or HF
  ``Dinov2Model`` layouts): the teacher heads are **made** — randomly initialised from
  ``distill.head_seed`` with the student's head sizes, then frozen. A frozen random head is a fixed
  random projection of the teacher's features onto the prototypes; Sinkhorn-Knopp centering turns it
  into balanced soft assignments, so the student still learns the teacher's similarity structure
  (tested in ``tests/test_distill.py``).

Several students (``distill.extra_students``, each a name and a ``model``) are trained in the same
step: one teacher forward per batch serves them all. Each student has its own heads, EMA, gradient
clipping and export (``{name}_backbone.safetensors``); their losses are summed, and as their parameters
are disjoint each learns exactly what it would learn alone (tested).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

from torch import nn

from dinov2.config import Config, ConfigError, load_run_config
from dinov2.distributed.checkpoint_dir import is_checkpoint, newest_checkpoint
from dinov2.models import build_backbone
from dinov2.train.export import Export
from dinov2.train.meta_arch import Network, SSLMetaArch, build_heads, ema_update

logger = logging.getLogger(__name__)


class DistillMetaArch(SSLMetaArch):
    def __init__(self, cfg: Config, teacher: Network) -> None:
        super().__init__(cfg, teacher=teacher)
        # dinov3 (train/ssl_meta_arch.py get_student_output): ``masks=[masks if not distillation else None,
        # None]``: the student sees the global crops whole, the iBOT loss still compares the drawn patches
        self.student_masks = cfg.distill.student_masks
        if cfg.distill.layerwise_decay is not None:  # dinov3's distillation decays by 0.99 (docs/PARITY.md)
            self.layerwise_decay = cfg.distill.layerwise_decay
        self.extra_students = nn.ModuleDict()
        self.extra_configs = {extra.name: extra_student_config(cfg, extra.name) for extra in cfg.distill.extra_students}
        for extra in cfg.distill.extra_students:
            _check_student_name(extra.name, self.extra_students)
            backbone = build_backbone(extra.model)
            self.extra_students[extra.name] = Network(
                backbone,
                build_heads(backbone.embed_dim, cfg.dino_head, cfg.ibot_head),
            )
        for name, student in self.trained_networks().items():
            if teacher.backbone.patch_size != student.backbone.patch_size:
                raise ValueError(
                    f"teacher patch size {teacher.backbone.patch_size} != {name} patch size "
                    f"{student.backbone.patch_size}: iBOT needs the same patch grid (set its model.patch_size)"
                )
        self.student_ema = _frozen_copy(self.student)
        self.extra_emas = nn.ModuleDict({name: _frozen_copy(s) for name, s in self.extra_students.items()})

    def train(self, mode: bool = True) -> DistillMetaArch:
        super().train(mode)
        self.student_ema.eval()
        self.extra_emas.eval()
        return self

    def update_ema(self, momentum: float) -> None:
        """The teacher is frozen; the students' EMAs move instead, at the schedule's momentum (cosine from
        ``distill.student_ema_momentum`` to ``distill.final_student_ema_momentum``: ``dinov2.train.schedules``)."""
        ema_update(self.student_ema, self.student, momentum)
        for name, student in self.extra_students.items():
            ema_update(self.extra_emas[name], student, momentum)

    def networks(self) -> dict[str, Network]:
        nets = {"student": self.student, "teacher": self.teacher, "student_ema": self.student_ema}
        for name, student in self.extra_students.items():
            nets[name] = student
            nets[f"{name}_ema"] = self.extra_emas[name]
        return nets

    def trained_networks(self) -> dict[str, Network]:
        return {"student": self.student, **self.extra_students}

    def exports(self) -> list[Export]:
        """The students' EMAs: ``student_backbone.safetensors``, and ``{name}_backbone.safetensors`` with the
        ``{name}_config.yaml`` that ``dinov2-eval`` / ``dinov2-curate`` rebuild an extra student from."""
        extras = [Export(name, ema.backbone, self.extra_configs[name]) for name, ema in self.extra_emas.items()]
        return [Export("student", self.student_ema.backbone), *extras]


def teacher_run_config(cfg: Config, run_ckpt: Path) -> Config:
    """The configuration a teacher run trained with (its ``config.yaml``; ``distill.teacher_model`` when it
    has none), checked against the student's heads: they must have the teacher's number of prototypes."""
    teacher_cfg = teacher_config(cfg)
    run_config = run_ckpt.parent.parent / "config.yaml"
    if run_config.is_file():
        teacher_cfg = load_run_config(run_config)
    if teacher_cfg.dino_head.out_dim != cfg.dino_head.out_dim:
        raise ValueError(
            f"the teacher run has {teacher_cfg.dino_head.out_dim} prototypes but dino_head.out_dim is "
            f"{cfg.dino_head.out_dim}: the student's heads must have the teacher's number of prototypes"
        )
    return teacher_cfg


def extra_student_config(cfg: Config, name: str) -> Config:
    """The run's config with ``model`` set to extra student ``name``'s and no extra students: what
    ``{name}_config.yaml`` holds beside its exported backbone."""
    config = copy.deepcopy(cfg)
    config.model = copy.deepcopy({s.name: s.model for s in cfg.distill.extra_students}[name])
    config.distill.extra_students = []
    return config


def _frozen_copy(network: Network) -> Network:
    frozen = copy.deepcopy(network)
    frozen.requires_grad_(False)
    return frozen.eval()


def _check_student_name(name: str, taken: nn.ModuleDict) -> None:
    """Names become file names and log keys: plain, unique, and not one of the built-in networks."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise ConfigError(
            f"distill.extra_students: name {name!r} must be letters, digits, '-' or '_' (it names the export file)"
        )
    if name in taken or name in ("student", "teacher", "student_ema") or name.endswith("_ema"):
        raise ConfigError(f"distill.extra_students: name {name!r} is taken; give each extra student its own name")


def teacher_config(cfg: Config) -> Config:
    """The teacher's full config: the student's, with ``model`` replaced by ``distill.teacher_model``."""
    teacher_cfg = copy.deepcopy(cfg)
    teacher_cfg.model = copy.deepcopy(cfg.distill.teacher_model)
    teacher_cfg.model.drop_path_rate = 0.0
    return teacher_cfg


def find_run_checkpoint(path: Path) -> Path | None:
    """A DCP checkpoint directory of ours at or under ``path`` (the newest), or None."""
    if is_checkpoint(path):
        return path
    for candidate in (path / "checkpoints", path):
        latest = newest_checkpoint(candidate)
        if latest is not None:
            return latest
    return None
