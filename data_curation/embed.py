"""The ``embed`` stage: images → L2-normalised embeddings, written as shards of ``.npy``.

Input: a dataset named like :class:`dinov2.config.DatasetConfig` (``embed.input``: an image folder,
a file list, a manifest, JPEG blobs with an optional subset, ...). Model (``embed.model``):

* ``ours``: an export of our trainer (a run dir holding ``teacher_backbone.safetensors`` and
  ``config.yaml``, or a weights file with ``config.yaml`` beside it; ``dinov2.eval.backbone_io``);
* ``interop``: a weights file in the timm or HF DINOv2 layout (``dinov2.interop``);
* ``timm``: a timm model name, created with ``pretrained=False`` and filled from ``model.path`` when
  given (without weights it is a random network: useful for tests only);
* ``torchscript``: a scripted descriptor model (``images -> (B, D)``), the format SSCD publishes its
  copy-detection models in, loaded with ``torch.jit.load`` — never unpickled as Python objects, but a
  TorchScript file is a *program*: its ``forward`` runs as written by whoever made the file, so load
  only files from a source you trust. It carries no preprocessing, so ``embed.model.img_size`` (its
  input side), ``embed.model.mean`` / ``std`` (default ImageNet's) and ``embed.model.resize_mode``
  (``crop``: shorter side + centre crop; ``squash``: resized to a square, as SSCD recommends) say it.

Feature (``data_curation.descriptor``): the final-norm CLS token, or GeM of the patch tokens
(``pooling=gem``), optionally with the mean patch token (``patch_mean``), averaged over ``scales``
and over the mirror image (``flip_average``), L2-normalised; with ``whiten`` the rows are then
PCA-whitened on the pool (``data_curation.whitening``) when every shard is done: the shards go to
``embeddings/raw/`` first and the whitened rows to ``embeddings/``. Images are resized (shorter side
to ``resize``) and centre-cropped to ``crop``; both default to the training global crop size of our
checkpoint (the model's input size for timm / interop / torchscript weights).

Sharding and resumption: the dataset's records are cut into shards of ``shard_size`` consecutive
records; shard ``s`` is written as ``emb_{s:05d}.npy`` (+ its paths and skipped lists) by
:func:`data_curation.embeddings.write_shard`, whose ``.npy`` appears last and atomically. A re-run
skips every shard whose ``.npy`` exists. ``n`` tasks (``--shard-index i --num-shards n``, or the
``SLURM_ARRAY_TASK_ID`` of an array job) split the shards: task ``i`` writes the shards
``s ≡ i (mod n)``. Whichever task sees every shard present writes ``paths.txt``, ``skipped.txt`` and
``meta.json`` (:func:`finalize_embed`); a plain re-run of ``embed`` after an array job does the same
without loading the model.

Undecodable images are never replaced by another image (as training datasets do): their record is
left out of the shard and its path written to ``skipped_{s}.txt`` (``skipped.txt`` after finalize),
so every row of the embeddings is the image its path names. A feature that is not finite is
treated the same way.

The work is pinned by ``embed_plan.json`` (a fingerprint of the input, the record count, the model
weights and the feature settings): a re-run with a different plan refuses to mix shards unless
``--force`` is given, which recomputes this task's shards. ``stats_{s}.json`` records each shard's
time and throughput (the measured figures ``docs/curation.md`` scales from).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from data_curation import embeddings as emb_io
from data_curation.atomic import read_lines, write_json
from data_curation.config import CurationConfig, EmbedConfig, EmbedInputConfig, EmbedModelConfig
from data_curation.errors import CurationError
from data_curation.whitening import WHITENING_FILE, fit_whitening
from data_curation.workdir import fingerprint, funnel, resolve_path
from dinov2.config import DatasetConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PLAN_FILE = "embed_plan.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_KINDS = ("ours", "interop", "timm", "torchscript")
RAW_DIR = "raw"  # embed.whiten: the unwhitened shards, under the embeddings dir


# ------------------------------------------------------------------------------------------ tasks
def resolve_task(task_index: int, num_tasks: int, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(i, n)``: this process is task ``i`` of ``n``.

    Explicit values (``task_index >= 0``, ``num_tasks >= 1``) win; ``(-1, 0)`` means automatic: the
    task of a SLURM array job (``SLURM_ARRAY_TASK_ID`` relative to ``SLURM_ARRAY_TASK_MIN``, out of
    ``SLURM_ARRAY_TASK_COUNT``), else the only task.
    """
    if task_index >= 0 and num_tasks >= 1:
        if task_index >= num_tasks:
            raise ValueError(f"shard index {task_index} is not below the number of shards {num_tasks}")
        return task_index, num_tasks
    if task_index == -1 and num_tasks == 0:
        env = os.environ if environ is None else environ
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            return resolve_task(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]))
        return 0, 1
    raise ValueError(f"give both the shard index and the number of shards (got index {task_index}, number {num_tasks})")


def task_shards(num_data_shards: int, task_index: int, num_tasks: int) -> list[int]:
    """The data shards task ``task_index`` of ``num_tasks`` writes: ``s ≡ task_index (mod num_tasks)``."""
    return list(range(task_index, num_data_shards, num_tasks))


# ------------------------------------------------------------------------------------------ input
def absolute_path(path: str) -> str:
    """``path`` made absolute (relative to the current directory); ``{split}`` is kept as is."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def resolved_input(inp: EmbedInputConfig) -> EmbedInputConfig:
    """A copy of ``inp`` with absolute paths (array jobs may start in another directory)."""
    return replace(inp, path=absolute_path(inp.path), subset_path=absolute_path(inp.subset_path))


def build_input(inp: EmbedInputConfig) -> Any:
    """The :class:`dinov2.data.base.ImageDataset` that ``embed.input`` names."""
    from dinov2.data import build_dataset  # lazy: torch (~2 s); curation modules import without it

    if inp.kind != "demo" and not inp.path:
        raise ValueError("embed.input.path is empty: set it to the images (folder, list, manifest or blobs)")
    ds_cfg = DatasetConfig(
        kind=inp.kind,
        path=inp.path,
        split=inp.split,
        subset_path=inp.subset_path,
        max_bad_fraction=inp.max_bad_fraction,
    )
    return build_dataset(ds_cfg)


def input_source(inp: EmbedInputConfig) -> str:
    """The ``source`` name written to ``meta.json`` (the manifest's source column)."""
    if inp.source:
        return inp.source
    path = inp.path.replace("{split}", inp.split)
    return f"{path}:{inp.split}" if inp.kind in ("blobs", "cifar10_blobs", "demo") else path


# ------------------------------------------------------------------------------------------ model
def _file_digest(path: Path, block: int = 1 << 20) -> str:
    """Size + hash of the first and last MiB: identifies a weights file without reading gigabytes."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(block))
        if size > 2 * block:
            f.seek(size - block)
            digest.update(f.read(block))
    return digest.hexdigest()[:16]


def _weights_file(m: EmbedModelConfig) -> Path | None:
    if m.kind not in MODEL_KINDS:
        raise ValueError(f"embed.model.kind must be one of {', '.join(MODEL_KINDS)}, got {m.kind!r}")
    if m.kind == "ours":
        if not m.path:
            raise ValueError("embed.model.path is empty: give our run dir or exported weights file")
        from dinov2.eval.backbone_io import find_weights  # lazy: torch (~2 s); curation modules import without it

        return find_weights(m.path)
    if m.kind == "interop":
        if not m.path:
            raise ValueError("embed.model.path is empty: give a timm/HF DINOv2 weights file")
        return Path(m.path)
    if m.kind == "torchscript":
        if not m.path or not Path(m.path).is_file():
            raise ValueError(f"embed.model.path={m.path!r} is not a file: give the TorchScript model (*.pt)")
        if m.img_size <= 0 and m.resize_mode == "squash":
            raise ValueError("embed.model.resize_mode=squash needs embed.model.img_size (the model's input side)")
        return Path(m.path)
    if not m.name:
        raise ValueError("embed.model.name is empty: give a timm model name (e.g. vit_small_patch14_dinov2)")
    return Path(m.path) if m.path else None


def model_fingerprint(m: EmbedModelConfig) -> dict[str, str]:
    """What identifies the model: kind, name, weights file digest, and our config file's digest."""
    weights = _weights_file(m)
    out = {"kind": m.kind, "name": m.name, "weights": ""}
    if weights is not None:
        if weights.is_dir():  # an HF model folder
            out["weights"] = fingerprint(sorted((p.name, _file_digest(p)) for p in weights.glob("*.safetensors")))
        else:
            out["weights"] = _file_digest(weights)
    if m.kind == "ours":
        config = Path(m.config) if m.config else weights.parent / "config.yaml"
        out["config"] = _file_digest(config) if config.is_file() else ""
    if m.kind == "torchscript":
        out["preprocess"] = fingerprint(m.img_size, list(m.mean), list(m.std), m.resize_mode)
    return out


@dataclass
class LoadedModel:
    """A backbone whose forward returns ``{"cls": (B, D), "patch": (B, N, D)}``, and its preprocessing."""

    backbone: Any
    model_id: str
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    squash: bool = False  # resize to crop x crop without keeping the aspect ratio (torchscript resize_mode)
    patch_size: int = 1  # inputs of other sizes must be multiples of it (multi-scale descriptors)


def _timm_backbone(m: EmbedModelConfig) -> tuple[Any, int, tuple, tuple]:
    import timm  # optional dependency (timm is not required)
    from torch import nn  # lazy: torch (~2 s); curation modules import without it

    extra = {"img_size": m.img_size} if m.img_size else {}
    model = timm.create_model(m.name, pretrained=False, num_classes=0, **extra)
    if m.path:
        from dinov2.interop import read_state_dict  # lazy: torch (~2 s); curation modules import without it

        state = read_state_dict(m.path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("head")]  # classifier weights: not needed
        if missing or unexpected:
            raise ValueError(
                f"{m.path} does not fit timm model {m.name}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
    else:
        log.warning("embed: timm model %s has random weights (no embed.model.path): test use only", m.name)

    class TimmTokens(nn.Module):
        """timm model → {"cls", "patch"} like our backbone."""

        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            feats = self.inner.forward_features(x)
            if feats.ndim == 4:  # a CNN: (B, C, H, W)
                pooled = self.inner.forward_head(feats, pre_logits=True)
                return {"cls": pooled, "patch": feats.flatten(2).transpose(1, 2)}
            prefix = int(getattr(self.inner, "num_prefix_tokens", 1))
            cls = feats[:, 0] if prefix else feats.mean(dim=1)
            return {"cls": cls, "patch": feats[:, prefix:]}

    data_cfg = getattr(model, "pretrained_cfg", {}) or {}
    crop = m.img_size or int((data_cfg.get("input_size") or (3, 224, 224))[-1])
    mean = tuple(data_cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(data_cfg.get("std") or IMAGENET_STD)
    return TimmTokens(model), crop, mean, std


def load_model(m: EmbedModelConfig, device: str | torch.device = "cpu") -> LoadedModel:
    """The backbone of ``embed.model`` in eval mode on ``device``, with its default preprocessing."""
    weights = _weights_file(m)
    if m.kind == "ours":
        from dinov2.eval.backbone_io import load_backbone  # lazy: torch (~2 s); curation modules import without it

        backbone, train_cfg = load_backbone(weights, m.config or None, device="cpu")
        crops = train_cfg.data.crops
        loaded = LoadedModel(backbone, f"ours:{weights}", crops.global_crops_size, tuple(crops.mean), tuple(crops.std))
    elif m.kind == "interop":
        from dinov2.interop import load_pretrained_backbone  # lazy: torch (~2 s); curation modules import without it

        backbone = load_pretrained_backbone(weights, num_heads=m.num_heads or None)
        loaded = LoadedModel(backbone, f"interop:{weights}", 224, IMAGENET_MEAN, IMAGENET_STD)
    elif m.kind == "torchscript":
        loaded = LoadedModel(
            _scripted_backbone(weights),
            f"torchscript:{weights}",
            m.img_size,
            tuple(m.mean or IMAGENET_MEAN),
            tuple(m.std or IMAGENET_STD),
            squash=m.resize_mode == "squash",
        )
    else:
        backbone, crop, mean, std = _timm_backbone(m)
        loaded = LoadedModel(backbone, f"timm:{m.name}" + (f":{weights}" if weights else ""), crop, mean, std)
    if m.kind != "torchscript":
        embed = getattr(loaded.backbone, "patch_embed", None)
        size = getattr(embed, "patch_size", 1)
        loaded.patch_size = int(size[0] if isinstance(size, tuple | list) else size)
    loaded.backbone = loaded.backbone.to(device).eval()
    return loaded


def _scripted_backbone(path: Path) -> Any:
    """A TorchScript descriptor model (see the module docstring for what loading one trusts)."""
    import torch  # lazy: torch (~2 s); curation modules import without it

    from data_curation.descriptor import ScriptedDescriptor

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise ValueError(f"{path} is not a TorchScript model ({str(e).splitlines()[0]})") from None
    return ScriptedDescriptor(scripted)


@dataclass(frozen=True)
class Preprocess:
    """The eval transform's settings, resolved against the model's defaults."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    squash: bool = False  # resize to crop x crop, not keeping the aspect ratio (no centre crop)

    @classmethod
    def resolve(cls, e: EmbedConfig, model: LoadedModel) -> Preprocess:
        crop = e.crop or model.crop
        if crop <= 0:
            raise ValueError("the model has no input size: set embed.model.img_size (torchscript) or embed.crop")
        squash = model.squash and not e.resize
        return cls(e.resize or crop, crop, tuple(e.mean or model.mean), tuple(e.std or model.std), squash)

    def transform(self) -> Any:
        from dinov2.eval.features import eval_transform  # lazy: torch (~2 s); curation modules import without it

        if not self.squash:
            return eval_transform(resize=self.resize, crop=self.crop, mean=self.mean, std=self.std)
        import torch  # lazy: torch (~2 s); curation modules import without it
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize((self.crop, self.crop), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )


# ------------------------------------------------------------------------------------------ plan
def feature_name(e: EmbedConfig) -> str:
    """What a row is, e.g. ``cls``, ``gem3+patch_mean``, ``cls@0.5,1+flip_average+whiten256``."""
    name = "cls" if e.pooling == "cls" else f"gem{e.gem_p:g}"
    if e.patch_mean:
        name += "+patch_mean"
    if list(e.scales) != [1.0]:
        name += "@" + ",".join(f"{s:g}" for s in e.scales)
    if e.flip_average:
        name += "+flip_average"
    if e.whiten:
        name += f"+whiten{e.whiten_dim or ''}"
    return name


def check_descriptor(e: EmbedConfig) -> None:
    """One-line errors for descriptor settings that cannot work, before any image is read."""
    if e.model.kind == "torchscript" and (e.pooling != "cls" or e.patch_mean):
        raise ValueError(
            "a torchscript model gives one descriptor per image: embed.pooling=gem / patch_mean need tokens"
        )
    if e.pooling == "gem" and e.gem_p <= 0:
        raise ValueError(f"embed.gem_p must be positive, got {e.gem_p}")
    if not e.scales or any(s <= 0 for s in e.scales):
        raise ValueError(f"embed.scales must be positive factors, got {list(e.scales)}")
    if e.whiten and e.whiten_sample < 2:
        raise ValueError("embed.whiten_sample must be at least 2")


def descriptor_model(model: LoadedModel, e: EmbedConfig) -> Any:
    """The backbone wrapped to give the descriptor ``e`` asks for (``data_curation.descriptor``)."""
    from data_curation.descriptor import DescriptorModel  # lazy: torch (~2 s); curation modules import without it

    return DescriptorModel(model.backbone, e.pooling, e.gem_p, e.scales, e.patch_mean, model.patch_size)


def shards_dir(out: Path, e: EmbedConfig) -> Path:
    """Where the shards are written: the embeddings dir, or its ``raw/`` folder when whitening follows."""
    return out / RAW_DIR if e.whiten else out


def make_plan(e: EmbedConfig, dataset: Any) -> dict[str, Any]:
    """What the shards of this run depend on, and their layout (written to ``embed_plan.json``)."""
    n = len(dataset)
    ends = [dataset.describe(0), dataset.describe(n - 1)] if n else []
    settings = {
        "input": {k: v for k, v in asdict(e.input).items() if k not in ("max_bad_fraction", "source")},
        "model": model_fingerprint(e.model),
        "feature": feature_name(e),
        "crop": e.crop,
        "resize": e.resize,
        "mean": list(e.mean),
        "std": list(e.std),
        "dtype": e.dtype,
        "shard_size": e.shard_size,
        "count": n,
        "ends": ends,
    }
    if e.whiten:  # (only then: the plans of earlier runs without these keys keep their fingerprint)
        settings["whiten_sample"] = e.whiten_sample
    return {
        "fingerprint": fingerprint("embed", settings),
        "count": n,
        "shard_size": e.shard_size,
        "num_shards": max(1, math.ceil(n / e.shard_size)),
        "settings": settings,
        "whiten": {"dim": e.whiten_dim, "sample": e.whiten_sample} if e.whiten else None,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _clear_outputs(out: Path, shards: list[int], num_shards: int, remove_extra: bool) -> None:
    """Forget finalized files, the given shards, and (``remove_extra``) shards beyond ``num_shards``
    (in the embeddings dir and in its ``raw/`` folder)."""
    for folder in (out, out / RAW_DIR):
        for name in ("meta.json", "paths.txt", "skipped.txt", WHITENING_FILE):
            (folder / name).unlink(missing_ok=True)
        doomed = set(shards)
        if remove_extra:
            doomed |= {s for s in emb_io.list_shards(folder) if s >= num_shards}
        for s in sorted(doomed):
            _clear_shard(folder, s)


def _clear_shard(out: Path, s: int) -> None:
    emb_io.shard_path(out, s).unlink(missing_ok=True)  # first: the shard is no longer "done"
    for stem in ("paths", "skipped"):
        (out / f"{stem}_{s:05d}.txt").unlink(missing_ok=True)
    (out / f"stats_{s:05d}.json").unlink(missing_ok=True)


def _check_plan(out: Path, plan: dict[str, Any], force: bool, shards: list[int], single_task: bool) -> None:
    """Write the plan, or check it against the one of an earlier run (see the module docstring)."""
    old = _read_json(out / PLAN_FILE)
    if old is not None and old.get("fingerprint") == plan["fingerprint"]:
        if force:
            _clear_outputs(out, shards, plan["num_shards"], remove_extra=single_task)
        return
    earlier = emb_io.list_shards(out) or emb_io.list_shards(out / RAW_DIR) or (out / "meta.json").is_file()
    if earlier:  # an earlier plan's output is there
        if not force:
            differs = sorted(
                k for k in plan["settings"] if (old or {}).get("settings", {}).get(k) != plan["settings"][k]
            )
            raise CurationError(
                f"{out} holds embeddings of another plan (differs in: {', '.join(differs) or 'unknown'}); "
                "re-run with --force to recompute, or set another `embeddings` dir"
            )
        _clear_outputs(out, shards, plan["num_shards"], remove_extra=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PLAN_FILE, plan)


# ------------------------------------------------------------------------------------------ work
class _NoSubstitute:
    """Records ``[start, stop)`` of an image dataset as ``(image, index)``, or ``(blank, -1)`` when a
    record cannot be decoded: the caller drops those rows instead of embedding another image."""

    def __init__(self, dataset: Any, start: int, stop: int, blank_size: int):
        self.dataset, self.start, self.stop, self.blank_size = dataset, start, stop, blank_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[Any, int]:
        index = self.start + i
        try:
            return self.dataset.load(index), index
        except Exception as error:  # one bad file must not stop the run: record it
            log.warning(
                "embed: skipping unreadable image %s (%s: %s)",
                self.dataset.describe(index),
                type(error).__name__,
                error,
            )
            return Image.new("RGB", (self.blank_size, self.blank_size)), -1


def embed_records(
    model: LoadedModel,
    dataset: Any,
    start: int,
    stop: int,
    pre: Preprocess,
    e: EmbedConfig,
    device: torch.device,
    progress: bool = False,
) -> tuple[np.ndarray, list[int], list[int]]:
    """Features of records ``[start, stop)``: (rows float32 (n_ok, D), their record indices, bad records)."""
    from dinov2.device import amp_dtype  # lazy: torch (~2 s); curation modules import without it
    from dinov2.eval.features import extract_features

    feats, index = extract_features(
        descriptor_model(model, e),
        _NoSubstitute(dataset, start, stop, pre.crop),
        transform=pre.transform(),
        batch_size=e.batch_size,
        device=device,
        num_workers=e.num_workers,
        amp_dtype=amp_dtype(e.amp, device),
        normalize=True,
        flip_average=e.flip_average,
        progress=progress,
    )
    feats, index = feats.numpy(), index.numpy()
    finite = np.isfinite(feats).all(axis=1)
    for r in np.flatnonzero((index >= 0) & ~finite):
        log.warning("embed: non-finite feature for %s: skipped", dataset.describe(int(index[r])))
    ok = (index >= 0) & finite
    bad = [start + r for r in np.flatnonzero(~ok).tolist()]
    return feats[ok], index[ok].tolist(), bad


def _check_bad_fraction(n_bad: int, n: int, limit: float, shard: int, source: str) -> None:
    if n >= 20 and n_bad > limit * n:
        raise CurationError(
            f"shard {shard}: {n_bad} of {n} images under {source} could not be decoded "
            f"(more than embed.input.max_bad_fraction={limit}); check embed.input.kind/path"
        )


def finalize_embed(out: str | Path, plan: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Write ``paths.txt`` / ``skipped.txt`` / ``meta.json`` when every planned shard is present.

    Returns the meta, or None while shards are missing. Safe to call from several tasks at once (the
    files are written atomically with identical content).
    """
    out = Path(out)
    plan = plan or _read_json(out / PLAN_FILE)
    if plan is None:
        raise FileNotFoundError(f"{out / PLAN_FILE} not found: run the embed stage first")
    whiten = plan.get("whiten")
    folder = out / RAW_DIR if whiten else out
    missing = [s for s in range(plan["num_shards"]) if not emb_io.shard_done(folder, s)]
    if missing:
        log.info(
            "embed: %d of %d shards still missing (e.g. %s): not finalized",
            len(missing),
            plan["num_shards"],
            missing[:5],
        )
        return None
    info = _read_json(out / "embed_info.json") or {}
    extra = {"embed_plan": plan["fingerprint"], "feature": info.get("feature", {})}
    if whiten:
        raw_meta = emb_io.finalize_embeddings(folder, info.get("model_id", ""), info.get("source", ""), extra=extra)
        whiten_shards(folder, out, raw_meta, whiten["dim"], whiten["sample"])
        extra["whitening"] = WHITENING_FILE
    return emb_io.finalize_embeddings(out, info.get("model_id", ""), info.get("source", ""), extra=extra)


def whiten_shards(raw: Path, out: Path, raw_meta: dict[str, Any], dim: int, sample: int, seed: int = 0) -> None:
    """Fit the PCA-whitening on (a sample of) the finalized ``raw`` rows, save it as ``out/whitening.npz``,
    and write every shard whitened to ``out`` with its paths and skipped lists."""
    count = raw_meta["count"]
    rows = np.arange(count) if count <= sample else np.sort(np.random.default_rng(seed).choice(count, sample, False))
    fit_rows, starts = [], np.cumsum([0, *raw_meta["shard_sizes"]])
    for s, (start, stop) in enumerate(zip(starts[:-1], starts[1:])):
        mine = rows[(rows >= start) & (rows < stop)] - start
        if mine.size:
            fit_rows.append(np.asarray(np.load(emb_io.shard_path(raw, s), mmap_mode="r")[mine], dtype=np.float32))
    x = np.concatenate(fit_rows)
    valid = emb_io.valid_rows(x)
    whitening = fit_whitening(x[valid], dim)
    log.info(
        "embed: PCA-whitening fitted on %d rows: %d -> %d dims",
        int(valid.sum()),
        x.shape[1],
        len(whitening.eigenvalues),
    )
    whitening.save(out / WHITENING_FILE)
    for s in range(len(raw_meta["shard_sizes"])):
        shard = np.asarray(np.load(emb_io.shard_path(raw, s)), dtype=np.float32)
        ok = emb_io.valid_rows(shard)
        y = np.zeros((len(shard), len(whitening.eigenvalues)), np.float32)  # unusable rows stay unusable
        y[ok] = whitening.apply(shard[ok])
        skipped_file = raw / f"skipped_{s:05d}.txt"
        emb_io.write_shard(
            out,
            s,
            y,
            read_lines(raw / f"paths_{s:05d}.txt"),
            skipped=read_lines(skipped_file) if skipped_file.is_file() else (),
            dtype=raw_meta["dtype"],
            normalize=False,
        )


def run_embed(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``embed`` stage (see the module docstring); returns a JSON-able summary."""

    from dinov2.device import resolve_device  # lazy: torch (~2 s); curation modules import without it

    cfg = cfg or CurationConfig()
    e = cfg.embed
    check_descriptor(e)
    if e.dtype not in ("float16", "float32"):
        raise ValueError(f"embed.dtype must be float16 or float32, got {e.dtype!r}")
    if e.shard_size < 1 or e.batch_size < 1:
        raise ValueError("embed.shard_size and embed.batch_size must be positive")
    e = replace(
        e,
        input=resolved_input(e.input),
        model=replace(e.model, path=absolute_path(e.model.path), config=absolute_path(e.model.config)),
    )
    task, num_tasks = resolve_task(e.task_index, e.num_tasks)
    out = resolve_path(workdir, cfg.embeddings)
    t0 = time.perf_counter()
    dataset = build_input(e.input)
    plan = make_plan(e, dataset)
    mine = task_shards(plan["num_shards"], task, num_tasks)
    _check_plan(out, plan, force, mine, single_task=num_tasks == 1)
    summary: dict[str, Any] = {
        "n_images": plan["count"],
        "n_shards": plan["num_shards"],
        "task": f"{task}/{num_tasks}",
        "shards_of_task": len(mine),
    }
    meta_file = out / "meta.json"
    if meta_file.is_file() and (_read_json(meta_file) or {}).get("embed_plan") == plan["fingerprint"]:
        meta = emb_io.read_meta(out)
        log.info("embed: %s already finalized (%d rows), skipping; use --force to recompute", out, meta["count"])
        return {
            **summary,
            "finalized": True,
            "count": meta["count"],
            "num_skipped": meta["num_skipped"],
            "shards_written": 0,
            **funnel(meta["count"] + meta["num_skipped"], meta["count"]),
        }
    folder = shards_dir(out, e)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [s for s in mine if not emb_io.shard_done(folder, s)]
    log.info(
        "embed: %d images, %d shards of %d; task %d/%d owns %d, %d to do",
        plan["count"],
        plan["num_shards"],
        e.shard_size,
        task,
        num_tasks,
        len(mine),
        len(todo),
    )

    rows = skipped = 0
    seconds = 0.0
    if todo:
        device = resolve_device(e.device or "auto")
        model = load_model(e.model, device)
        pre = Preprocess.resolve(e, model)
        feature = {"feature": feature_name(e), **asdict(pre)}
        write_json(
            out / "embed_info.json",
            {
                "model_id": model.model_id,
                "source": input_source(e.input),
                "feature": feature,
                "plan": plan["fingerprint"],
                "embed_config": asdict(e),  # what `calibrate` re-embeds planted copies with
            },
        )
        bar = tqdm(
            total=sum(min(e.shard_size, plan["count"] - s * e.shard_size) for s in todo),
            desc="embed",
            unit="img",
            disable=not cfg.progress,
            smoothing=0.1,
        )
        for s in todo:
            start, stop = s * e.shard_size, min((s + 1) * e.shard_size, plan["count"])
            _clear_shard(folder, s)  # stale paths/skipped files of an interrupted or forced shard
            t_shard = time.perf_counter()
            x, index, bad = embed_records(model, dataset, start, stop, pre, e, device, progress=cfg.progress)
            _check_bad_fraction(len(bad), stop - start, e.input.max_bad_fraction, s, dataset.source)
            paths = [dataset.describe(i) for i in index]
            bad_paths = [dataset.describe(i) for i in bad]
            elapsed = time.perf_counter() - t_shard
            write_json(
                folder / f"stats_{s:05d}.json",
                {
                    "shard": s,
                    "images": stop - start,
                    "rows": len(x),
                    "skipped": len(bad),
                    "seconds": round(elapsed, 3),
                    "images_per_s": round((stop - start) / max(elapsed, 1e-9), 2),
                    "device": str(device),
                    "host": socket.gethostname(),
                    "batch_size": e.batch_size,
                    "num_workers": e.num_workers,
                    "model_id": model.model_id,
                    **feature,
                },
            )
            emb_io.write_shard(folder, s, x, paths, skipped=bad_paths, dtype=e.dtype)
            rows, skipped, seconds = rows + len(x), skipped + len(bad), seconds + elapsed
            bar.update(stop - start)
            bar.set_postfix(shard=s, skipped=skipped)
        bar.close()
        del model
    meta = finalize_embed(out, plan)
    summary.update(
        {
            "shards_written": len(todo),
            "rows_written": rows,
            "inputs_skipped": skipped,
            "embed_seconds": round(seconds, 3),
            "images_per_s": round((rows + skipped) / seconds, 2) if seconds > 0 else None,
            "seconds": round(time.perf_counter() - t0, 3),
            "finalized": meta is not None,
        }
    )
    if meta is not None:
        summary.update({"count": meta["count"], "num_skipped": meta["num_skipped"]})
        summary.update(funnel(meta["count"] + meta["num_skipped"], meta["count"]))
    return summary
