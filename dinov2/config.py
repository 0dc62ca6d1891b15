"""Typed configuration: dataclass schema + YAML presets + dotlist overrides.

Every key a user can set is a field below. Loading merges, in order, the schema defaults, the YAML
file(s) and the command-line ``key=value`` overrides; an unknown key anywhere is an error that names
it and the closest valid key. YAML is read through OmegaConf only (no arbitrary object construction).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, with a one-line actionable message."""


# --------------------------------------------------------------------------------------------- model
class PosEmbedInterpolation(StrEnum):
    """``model.pos_embed_interpolation``: whose resampling of the position embedding to another patch
    grid (``dinov2.models.pos_embed``). ``reference``: dinov2's ``interpolate_pos_encoding`` as trained and
    released (bicubic, ``scale_factor=(h + 0.1) / M``, no antialias); ``reference_reg``: the released
    ``*_reg`` models (exact size, antialias); ``hf``: transformers' ``Dinov2Model`` (exact size, no
    antialias); ``timm``: ``resample_abs_pos_embed`` (exact size, antialias); ``ours``: this project's
    original choice (exact size, antialias)."""

    reference = "reference"
    reference_reg = "reference_reg"
    hf = "hf"
    timm = "timm"
    ours = "ours"


#: ``model.arch``
Arch = Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"]
FfnLayer = Literal["mlp", "swiglu"]
#: ``model.drop_path_mode``: efficient (the branch runs on a subset of samples) | classic (per-sample mask)
DropPathMode = Literal["efficient", "classic"]
#: ``*_head.mlp_init``: the head MLP's init (the reference's trunc-normal 0.02, or torch's fan-in default)
HeadMlpInit = Literal["trunc_normal", "fan_in"]
#: ``model.attn_backend`` (``dinov2.layers.attention``)
AttnBackend = Literal["auto", "sdpa", "math", "flex", "varlen", "xformers"]
#: ``data.pipeline``: PIL/torchvision workers, or batched augmentation on the device
Pipeline = Literal["cpu", "gpu"]
#: ``loss.centering`` of the teacher's targets
Centering = Literal["sinkhorn_knopp", "softmax"]
#: ``optim.lr_scaling`` of ``base_lr`` with the total batch (relative to 1024)
LrScaling = Literal["sqrt", "linear", "none"]
#: ``distributed.activation_checkpointing``: none | every student block | every second block
ActivationCheckpointing = Literal["none", "full", "selective"]
#: FSDP2 mixed-precision dtypes (``distributed.param_dtype``, ``reduce_dtype``)
FsdpDtype = Literal["bf16", "fp16", "fp32"]
#: ``distributed.backend`` of the process group
DistBackend = Literal["auto", "nccl", "gloo"]
#: ``optim.clip_grad_mode``: each of backbone / DINO head / iBOT head on its own (the reference), or one norm
ClipMode = Literal["per_module", "global"]
#: ``distill.teacher_format``: the teacher weights' layout
TeacherFormat = Literal["auto", "ours", "timm", "hf"]


@dataclass(frozen=True)
class ArchSpec:
    """The width, depth, heads and FFN kind an ``arch`` name stands for (timm / the reference's names)."""

    embed_dim: int
    depth: int
    num_heads: int
    ffn_layer: FfnLayer = "mlp"

    def fill(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with this arch's width, depth, heads and FFN kind wherever they are missing or None."""
        return {**values, **{f.name: getattr(self, f.name) for f in fields(self) if values.get(f.name) is None}}


ARCHS: dict[str, ArchSpec] = {
    "vit_tiny": ArchSpec(192, 12, 3),
    "vit_small": ArchSpec(384, 12, 6),
    "vit_base": ArchSpec(768, 12, 12),
    "vit_large": ArchSpec(1024, 24, 16),
    "vit_giant2": ArchSpec(1536, 40, 24, "swiglu"),
}


@dataclass
class ModelConfig:
    arch: Arch = "vit_small"
    patch_size: int = 14
    img_size: int = 224  # size the position embedding is learned at; other sizes interpolate
    in_chans: int = 3
    embed_dim: int | None = None  # None: the arch's default (for custom tiny models)
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    ffn_layer: FfnLayer | None = None  # None: the arch's default
    num_register_tokens: int = 0
    layerscale_init: float | None = 1.0e-5  # None disables LayerScale
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True  # same rate in every block (DINOv2) vs linearly increasing
    drop_path_mode: DropPathMode = "efficient"
    attn_backend: AttnBackend = "auto"
    # None: "ours" for a model we train; for weights loaded through dinov2.interop, what the file says
    # (our exports record it), else "reference" ("reference_reg" with registers), as released
    pos_embed_interpolation: PosEmbedInterpolation | None = None

    def resolved(self) -> ModelConfig:
        """A copy with the arch's defaults filled in (``embed_dim``, ``depth``, ``num_heads``, ``ffn_layer``):
        what every reader of the architecture (the model, the FLOP formulas, the memory plan) starts from."""
        spec = ARCHS[self.arch]
        return dataclasses.replace(self, **spec.fill({f.name: getattr(self, f.name) for f in fields(spec)}))


@dataclass
class HeadConfig:
    out_dim: int = 65536  # number of prototypes K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    # trunc_normal: the reference's init (std 0.02); fan_in: std 1/sqrt(fan_in), for narrow CPU-recipe
    # backbones (dinov2/layers/dino_head.py DINOHead.reset_parameters)
    mlp_init: HeadMlpInit = "trunc_normal"


# --------------------------------------------------------------------------------------------- data
#: ``data.dataset.kind``; ``auto`` reads the path as what it looks like (dinov2.data.datasets.resolve_kind),
#: as ``demo`` does when given a path
DatasetKind = Literal["auto", "folder", "filelist", "manifest", "arrays", "demo", "blobs", "cifar10_blobs", "shards"]


@dataclass
class DatasetConfig:
    kind: DatasetKind = "folder"  # see DatasetKind; blobs: byte blobs + offsets (alias cifar10_blobs)
    path: str = ""  # folder root, list/manifest file, .npz of arrays, blobs folder; "{split}" is replaced
    split: str = "train"  # for datasets that have splits (demo, blobs) or a "{split}" in path
    max_bad_fraction: float = 0.5  # stop if more than this fraction of samples fail to decode
    subset_path: str = ""  # blobs: optional .npy of indices to keep ("{split}" is replaced)
    index_cache_dir: str = ""  # shards: where indexes of read-only shards go ("": ~/.cache/dinov2/shard-index)
    demo_image_size: int = 32  # demo: side of the generated images
    demo_num_train: int = 5000  # demo: images in the train split
    demo_num_test: int = 1000  # demo: images in the test split
    demo_seed: int = 0  # demo: the images are a function of this seed (not of train.seed)


@dataclass
class CropsConfig:
    global_crops_size: int = 224
    local_crops_size: int = 98
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    local_crops_number: int = 8
    hflip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p_global1: float = 1.0  # first global crop: always blurred
    blur_p_global2: float = 0.1
    blur_p_local: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # true: blur as the released weights were trained (the reference's RandomApply(p=1-p) inversion:
    # first global crop never, second 0.9, locals 0.5 with the defaults above; 9 taps at every size)
    blur_as_released: bool = False
    solarize_p_global2: float = 0.2
    solarize_threshold: float = 0.5  # fraction of the pixel range (128 / 255 for uint8)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class MaskConfig:
    mask_probability: float = 0.5  # fraction of global crops that are masked
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    min_num_patches: int = 4
    aspect_ratio_min_max: list[float] = field(default_factory=lambda: [0.3, 1 / 0.3])


@dataclass
class DataConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    batch_size_per_gpu: int = 64
    num_workers: int = 8
    pin_memory: bool = True
    pipeline: Pipeline = "cpu"
    shuffle_window: int = 0  # shards: shuffle within windows of this many shards (0: one permutation of all)


# --------------------------------------------------------------------------------------------- loss
@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: Centering = "sinkhorn_knopp"
    center_momentum: float = 0.9
    sk_iterations: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30


# ------------------------------------------------------------------------------- copy detection
#: a single near-copy transform (dinov2.data.copy_augmentations), and a planted copy's kind (+ combinations)
CopyTransform = Literal["crop", "flip", "jpeg", "jitter", "rotate", "overlay"]
CopyKind = Literal["crop", "flip", "jpeg", "jitter", "rotate", "overlay", "combo"]


@dataclass
class CopyAugmentConfig:
    """Near-copy transforms (``dinov2.data.copy_augmentations``): the copy-detection recipe's views and the
    copies ``dinov2-curate calibrate`` plants. A transform's strength is drawn uniformly in its range."""

    crop_area: list[float] = field(default_factory=lambda: [0.5, 0.9])  # crop: kept fraction of the area
    crop_aspect: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # crop: width / height
    jpeg_quality: list[int] = field(default_factory=lambda: [20, 60])  # jpeg: re-encoding quality
    jitter: float = 0.3  # jitter: brightness, contrast and saturation factors in [1 - j, 1 + j]
    hue: float = 0.05  # jitter: hue shift in [-hue, hue] (fraction of the colour wheel)
    rotate_degrees: float = 10.0  # rotate: angle in [-r, r], the corners filled by stretching (no borders)
    overlay_size: list[float] = field(default_factory=lambda: [0.15, 0.35])  # overlay: text height / image height
    overlay_opacity: list[float] = field(default_factory=lambda: [0.6, 1.0])  # overlay: alpha of the text or box
    combo_size: list[int] = field(default_factory=lambda: [2, 3])  # combo: how many different transforms


@dataclass
class CopyDetectionConfig:
    """``train.objective=copy_detection`` (SSCD-style instance discrimination, ``dinov2.train.copy_detection``)."""

    temperature: float = 0.05  # InfoNCE temperature (SSCD: 0.05)
    entropy_weight: float = 30.0  # weight of the KoLeo differential-entropy term (SSCD: 30)
    kinds: list[CopyTransform] = field(
        default_factory=lambda: ["crop", "flip", "jpeg", "jitter", "rotate", "overlay"]
    )  # transforms a training view may get, each independently with probability transform_p
    transform_p: float = 0.5
    augment: CopyAugmentConfig = field(default_factory=CopyAugmentConfig)


# ---------------------------------------------------------------------------------------- optimizer
@dataclass
class OptimConfig:
    epochs: int = 100
    epoch_length: int = 1250  # iterations per "epoch" (schedules are defined in epochs)
    base_lr: float = 0.004  # for a total batch of 1024, scaled by lr_scaling
    lr_scaling: LrScaling = "sqrt"  # relative to a total batch of 1024
    min_lr: float = 1.0e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    freeze_last_layer_epochs: float = 1
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0  # 0 disables clipping
    # per_module: backbone, DINO head and iBOT head each clipped to clip_grad (the reference); global: one
    # norm over the whole student (dinov2/train/clipping.py)
    clip_grad_mode: ClipMode = "per_module"
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    fused: bool = True  # fused AdamW when the device supports it


# ------------------------------------------------------------------------------------ distributed
@dataclass
class MeshConfig:
    """The 2-D device mesh FSDP2 shards over (HSDP): ``replicate × shard`` = world size. Parameters are
    sharded across the ``shard`` ranks of a group and replicated across the ``replicate`` groups. None:
    derived (``dinov2.distributed.mesh``): one group per node when the job spans several nodes, full
    sharding on one node; give one of the two and the other follows from the world size."""

    replicate: int | None = None
    shard: int | None = None


@dataclass
class DistributedConfig:
    fsdp: bool = False  # shard student and teacher with FSDP2 (always on when world size > 1)
    param_dtype: FsdpDtype = "bf16"  # fp32 on CPU for exactness
    reduce_dtype: FsdpDtype = "fp32"
    activation_checkpointing: ActivationCheckpointing = "none"
    compile: bool = False  # torch.compile each block
    backend: DistBackend = "auto"
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # FSDP2 reshard_after_forward per network (docs/launch.md): the student re-gathers its blocks in
    # backward (ZeRO-3), the teacher (no backward) frees each block as soon as its forward is done
    student_reshard_after_forward: bool = True
    teacher_reshard_after_forward: bool = True
    forward_prefetch: int = 1  # blocks whose all-gather is issued ahead in forward (0: FSDP2's implicit only)
    backward_prefetch: int = 1  # blocks whose all-gather is issued ahead in backward (0: implicit only)


# --------------------------------------------------------------------------------------------- train
@dataclass
class StudentConfig:
    """One more student distilled in the same step: it shares the batch and the teacher's forward."""

    name: str = ""  # letters, digits, '-' or '_': exported as {name}_backbone.safetensors, logged as {name}/…
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class DistillConfig:
    enabled: bool = False
    teacher_checkpoint: str = ""  # our export, timm or HF layout (see docs/distillation.md)
    teacher_format: TeacherFormat = "auto"
    teacher_model: ModelConfig = field(default_factory=ModelConfig)
    # The distillation recipe: dinov3's (configs/train/dinov3_vitl16_lvd1689m_distilled.yaml, its `schedules`;
    # train/ssl_meta_arch.py). Each of these replaces, in a distillation run, its optim/loss counterpart.
    student_masks: bool = False  # False: the student sees the global crops unmasked (iBOT still on the drawn patches)
    teacher_temp_warmup: bool = False  # False: teacher temperature constant at loss.teacher_temp (0.07)
    freeze_last_layer: bool = False  # True: freeze the prototypes for optim.freeze_last_layer_epochs
    cosine_weight_decay: bool = False  # False: weight decay constant at optim.weight_decay (0.04)
    layerwise_decay: float | None = 0.99  # None: optim.layerwise_decay
    student_ema_momentum: float = 0.994  # the students' EMA: cosine from this ...
    final_student_ema_momentum: float = 1.0  # ... to this over the run
    student_ema_warmup: bool = False  # True: min(m, (1 + t) / (10 + t)) on top (schedules.ema_warmup; short runs)
    head_seed: int = 0  # backbone-only teachers: seed of the made (random, frozen) teacher heads
    extra_students: list[StudentConfig] = field(default_factory=list)  # trained next to `model`, same heads config


@dataclass
class EvalConfig:
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    final_knn: bool = False  # run k-NN on the dataset's held-out split after training
    test_split: str = "test"  # the held-out split of data.dataset used by final_knn
    test_path: str = ""  # final_knn: a second dataset (same kind as data.dataset) for the queries, e.g. a val folder
    # final_knn / dinov2-eval when the train and test sides are the same images (a folder without splits):
    # this fraction of them (a fixed draw) is held out of the memory bank as queries, and the score says so
    holdout_fraction: float = 0.1
    batch_size: int = 256  # images per feature-extraction batch
    # eval transform: shorter side resized to `resize`, centre crop `crop`. None: the checkpoint's evaluation
    # size, crop = data.crops.global_crops_size and resize = crop * 256 / 224 (the reference's ratio); 0: none
    resize: int | None = None
    crop: int | None = None
    linear_lrs: list[float] = field(
        default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    )  # swept jointly, one head each; chosen on a held-out part of the train split
    linear_epochs: int = 10
    linear_batch_size: int = 256
    linear_val_fraction: float = 0.1  # stratified share of the train split held out to choose the lr
    linear_patch_mean: bool = True  # linear features: [CLS, mean patch token] (False: CLS only)
    attention_num_images: int = 8  # images in the attention-map grid (evenly spaced over the split)
    attention_top_mass: float | None = None  # keep the top patches holding this attention mass (DINO: 0.6)


class Amp(StrEnum):
    """``train.amp``. No fp16: it needs loss scaling (a GradScaler over FSDP2 shards, its state in
    checkpoints, skipped steps), while bf16 keeps fp32's exponent range at fp16's speed on every GPU the
    recipe targets (A100, H100, H200)."""

    bf16 = "bf16"
    none = "none"


#: ``--device`` / ``train.device`` / ``embed.device`` (``dinov2.device.resolve_device``)
DeviceName = Literal["auto", "cpu", "cuda"]
#: evaluation's and curation's autocast choice (``dinov2.device.amp_dtype``); training has :class:`Amp`
AmpName = Literal["auto", "bf16", "fp16", "none"]


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    seed: int = 0
    max_iterations: int | None = None  # None: epochs * epoch_length
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last_checkpoints: int = 2
    amp: Amp = Amp.bf16  # autocast dtype on GPU: bf16 | none (CPU always runs fp32); fp16 is not offered (Amp)
    device: DeviceName = "auto"
    progress: bool = True
    tensorboard: bool = True
    export_teacher: bool = True  # export the final backbone(s) as safetensors (the students when distilling)
    stop_check_every: int = 10  # dinov2-submit: iterations between the ranks' collective check for a stop signal
    # what the loop optimises: DINO + iBOT + KoLeo self-distillation (or distillation), or instance
    # discrimination under copy augmentations (a copy detector, dinov2.train.copy_detection)
    objective: Literal["dino", "copy_detection"] = "dino"
    # a finished run whose student, teacher and heads this run starts from (dinov2-train --init-from;
    # dinov2.train.init_from): the high-resolution phase. Ignored once this run has its own checkpoint
    init_from: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    # None: the iBOT loss uses the DINO head (one head, as the reference's ibot.separate_head: false); a
    # head: a separate iBOT head of these sizes (the reference's vitl14 / vitg14)
    ibot_head: HeadConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    copy_detection: CopyDetectionConfig = field(default_factory=CopyDetectionConfig)

    def ibot_loss_head(self) -> HeadConfig:
        """The head whose prototypes the iBOT loss compares: ``ibot_head``, or the DINO head when shared."""
        return self.dino_head if self.ibot_head is None else self.ibot_head


# --------------------------------------------------------------------------------------------- loading
#: keys of older versions, and what replaced them: named when a config still sets one
REPLACED_KEYS = {
    "loss.ibot_separate_head": "ibot_head (null: the iBOT loss uses the DINO head; a head block: a separate iBOT head)",
}


def _nested_schema(hint: Any) -> type | None:
    """The dataclass a field of type ``hint`` holds (``HeadConfig`` or ``HeadConfig | None``), or None."""
    if isinstance(hint, type) and is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        nested = [t for t in typing.get_args(hint) if isinstance(t, type) and is_dataclass(t)]
        return nested[0] if len(nested) == 1 else None
    return None


def _all_keys(schema: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        out.append(key)
        nested = _nested_schema(hints[f.name])
        if nested is not None:
            out.extend(_all_keys(nested, key + "."))
    return out


def _unknown_key_error(schema: type, err: Exception, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or str(err).split("\n")[0]
    if key in REPLACED_KEYS:
        return ConfigError(f"{key} (in {source}) was replaced by {REPLACED_KEYS[key]}")
    valid = _all_keys(schema)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try the last component only
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in valid], n=1)
        close = [k for k in valid if close and k.endswith("." + close[0]) or k == (close or [""])[0]][:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def _merge(cfg: DictConfig, layer: DictConfig, schema: type, source: str) -> DictConfig:
    """``layer`` merged onto ``cfg``; an unknown key or a bad value is a ConfigError naming ``source``."""
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise _unknown_key_error(schema, e, source) from None
    except ValidationError as e:
        raise ConfigError(f"bad value in {source}: {str(e).splitlines()[0]}") from None


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    schema: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Schema defaults ← YAML ``path`` (may ``_base_: other.yaml``) ← ``key=value`` overrides."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    if path is not None:
        for layer_path, layer in _yaml_chain(Path(path)):
            cfg = _merge(cfg, layer, schema, str(layer_path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except (ConfigKeyError, ConfigAttributeError) as e:
            raise _unknown_key_error(schema, e, "command-line overrides") from None
        except ValidationError as e:
            raise ConfigError(f"bad value in override '{item}': {str(e).splitlines()[0]}") from None
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def load_run_config(path: str | Path) -> Config:
    """The configuration a run saved (its ``config.yaml``, or an export's, as :func:`to_yaml` wrote it). Keys
    of older versions are read as what replaced them (:func:`_upgrade_saved_layer`), as in any file
    :func:`load_config` reads."""
    return load_config(path)


def _upgrade_saved_layer(layer: DictConfig) -> None:
    """Read the keys of an older version in a complete file (one that holds the ``ibot_head`` block, as every
    saved ``config.yaml`` does, so the translation is exact): ``loss.ibot_separate_head: true`` keeps the
    file's ``ibot_head`` block, ``false`` makes it null. A partial file or an override that still sets the
    flag gets :data:`REPLACED_KEYS`' one-line error instead."""
    loss = layer.get("loss")
    if "ibot_head" in layer and isinstance(loss, DictConfig) and "ibot_separate_head" in loss:
        if not loss.pop("ibot_separate_head"):
            layer["ibot_head"] = None


def _yaml_chain(path: Path) -> list[tuple[Path, DictConfig]]:
    """The YAML file and its ``_base_`` ancestors, oldest first."""
    chain: list[tuple[Path, DictConfig]] = []
    seen: set[Path] = set()
    while True:
        path = resolve_config_path(path)
        if path in seen:
            raise ConfigError(f"config inheritance loops at {path}")
        seen.add(path)
        layer = OmegaConf.load(path)
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        base = layer.pop("_base_", None)
        if base is None:
            _upgrade_saved_layer(layer)
        chain.append((path, layer))
        if base is None:
            break
        path = path.parent / str(base)
    return chain[::-1]


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, or the name of a packaged preset such as ``train/vits14``."""
    p = Path(path)
    if p.is_file():
        return p.resolve()
    packaged = (
        Path(__file__).resolve().parent.parent
        / "configs"
        / (str(path) if str(path).endswith(".yaml") else f"{path}.yaml")
    )
    if packaged.is_file():
        return packaged
    raise ConfigError(f"config file '{path}' not found (give a YAML path or a preset like 'train/vits14')")


# ------------------------------------------------------------------------------------------ validation
def _writable_dir_problem(key: str, path: str) -> str | None:
    """Why ``path`` cannot be (made) a writable directory, or None. Nothing is left behind: the probe file is
    created in the nearest existing ancestor and removed (a real write, so read-only mounts show as root too)."""

    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        return f"{key}={path} is a file, not a directory"
    probe_dir = target
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{key}={path}: {probe_dir} is not a directory"
    try:
        fd, name = tempfile.mkstemp(prefix=".dinov2-write-check-", dir=probe_dir)
    except OSError as e:
        return f"{key}={path}: cannot write in {probe_dir} ({e.strerror or e})"
    os.close(fd)
    os.unlink(name)
    return None


def config_problems(cfg: Config) -> list[str]:
    """Every value of ``cfg`` that would fail later (a division by zero, an untrained export, a shape error,
    an unwritable run dir), as one message each; empty when the config can run."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    t, o, d, c, m = cfg.train, cfg.optim, cfg.data, cfg.data.crops, cfg.model
    need(t.checkpoint_every > 0, f"train.checkpoint_every must be > 0, got {t.checkpoint_every}")
    need(t.log_every > 0, f"train.log_every must be > 0, got {t.log_every}")
    need(t.keep_last_checkpoints > 0, f"train.keep_last_checkpoints must be > 0, got {t.keep_last_checkpoints}")
    if t.max_iterations is not None:
        need(t.max_iterations > 0, f"train.max_iterations must be > 0 (or null), got {t.max_iterations}")
    else:
        need(o.epochs > 0, f"optim.epochs must be > 0, got {o.epochs}")
        need(o.epoch_length > 0, f"optim.epoch_length must be > 0, got {o.epoch_length}")
    need(d.batch_size_per_gpu > 0, f"data.batch_size_per_gpu must be > 0, got {d.batch_size_per_gpu}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(o.base_lr >= 0, f"optim.base_lr must be >= 0, got {o.base_lr}")
    need(o.min_lr >= 0, f"optim.min_lr must be >= 0, got {o.min_lr}")
    need(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    need(o.clip_grad >= 0, f"optim.clip_grad must be >= 0, got {o.clip_grad}")
    models = [("model", m)] + ([("distill.teacher_model", cfg.distill.teacher_model)] if cfg.distill.enabled else [])
    models += [(f"distill.extra_students[{s.name}].model", s.model) for s in cfg.distill.extra_students]
    for key, model in models:
        for name in ("depth", "embed_dim", "num_heads"):
            value = getattr(model, name)
            need(value is None or value > 0, f"{key}.{name} must be > 0, got {value}")
        need(model.patch_size > 0, f"{key}.patch_size must be > 0, got {model.patch_size}")
        need(0.0 <= model.drop_path_rate < 1.0, f"{key}.drop_path_rate must be in [0, 1), got {model.drop_path_rate}")
    p = m.patch_size
    if p > 0:
        need(
            c.global_crops_size > 0 and c.global_crops_size % p == 0,
            f"data.crops.global_crops_size={c.global_crops_size} is not a positive multiple of model.patch_size={p}",
        )
        if c.local_crops_number > 0:
            need(
                c.local_crops_size > 0 and c.local_crops_size % p == 0,
                f"data.crops.local_crops_size={c.local_crops_size} is not a positive multiple of model.patch_size={p}",
            )
    need(c.local_crops_number >= 0, f"data.crops.local_crops_number must be >= 0, got {c.local_crops_number}")
    fraction = cfg.eval.holdout_fraction
    need(0.0 < fraction < 1.0, f"eval.holdout_fraction must be in (0, 1), got {fraction}")
    need(cfg.eval.batch_size > 0, f"eval.batch_size must be > 0, got {cfg.eval.batch_size}")
    if d.dataset.kind not in ("demo",) and not d.dataset.path:
        problems.append(f"no dataset path given; set data.dataset.path (data.dataset.kind={d.dataset.kind})")
    run_dir = _writable_dir_problem("train.output_dir", t.output_dir) if t.output_dir else "train.output_dir is empty"
    if run_dir:
        problems.append(run_dir)
    return problems


def validate(cfg: Config) -> None:
    """ConfigError listing every problem :func:`config_problems` finds (one line), before any work is done."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
