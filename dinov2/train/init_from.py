"""``dinov2-train --init-from RUN_DIR``: start a run from the weights of another (the high-resolution phase).

The DINOv2 paper ends pretraining with a short phase at 518 px global crops, continuing from the
224 px run (§4, "Adapting the resolution"; ``configs/train/vit*14_highres.yaml``). Such a phase is a
new run in its own output directory whose student, teacher and heads (DINO and iBOT) start from
``RUN_DIR``'s newest checkpoint — a DCP directory ``checkpoints/ckpt_*/``, read tensors only — or,
without one, from its exported ``teacher_backbone.safetensors`` (backbones only; the heads keep their
initialisation). Nothing else is taken: no optimizer moments, no data-stream position, no RNG state,
no iteration count, no centering state; the new config's schedules start at iteration 0. Every
position embedding is resampled once, to the new ``model.img_size`` grid, with the new config's
``model.pos_embed_interpolation``.

If the new output directory already holds a checkpoint, the run resumes from it and ``--init-from``
is not applied again (a preempted phase continues where it stopped).

:func:`check_init_from` validates before anything is written (the CLI turns its
:class:`InitFromError` into ``dinov2-train: error: …``, exit 2); :func:`init_from_run` loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from dinov2.config import ConfigError
from dinov2.distributed.checkpoint_dir import checkpoint_metadata, newest_checkpoint, quiet_single_process
from dinov2.models.pos_embed import interpolate_pos_embed
from dinov2.train.model_factory import ModelFactory

if TYPE_CHECKING:
    from dinov2.config import Config

logger = logging.getLogger(__name__)

#: the trained networks whose weights are copied (keys of the meta-architecture's state dict)
COPIED_PREFIXES = ("student.", "teacher.")
EXPORTED_BACKBONE = "teacher_backbone.safetensors"


class InitFromError(ConfigError):
    """``--init-from`` cannot be applied: a one-line reason."""


def find_source(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of ``run_dir``, else its exported teacher backbone."""
    run = Path(run_dir)
    if not run.is_dir():
        raise InitFromError(f"--init-from {run}: no such directory")
    latest = newest_checkpoint(run / "checkpoints")
    if latest is not None:
        return latest
    if (run / EXPORTED_BACKBONE).is_file():
        return run / EXPORTED_BACKBONE
    raise InitFromError(f"--init-from {run}: no checkpoint (checkpoints/ckpt_*/) and no {EXPORTED_BACKBONE}")


def _source_shapes(source: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key of the meta-architecture: (shape, dtype)}`` of the weights in ``source``."""
    if source.is_dir():
        metadata = checkpoint_metadata(source)
        out = {}
        for key, meta in metadata.items():
            name = key.removeprefix("model.")
            if key.startswith("model.") and name.startswith(COPIED_PREFIXES) and hasattr(meta, "size"):
                out[name] = (tuple(meta.size), meta.properties.dtype)
        return out
    with safe_open(str(source), framework="pt") as f:
        shapes = {k: (tuple(f.get_slice(k).get_shape()), torch.float32) for k in f.keys()}
    return {f"{net}backbone.{k}": v for net in COPIED_PREFIXES for k, v in shapes.items()}


def _target_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Shapes of the weights the new run's meta-architecture holds (built on the meta device: no memory)."""
    model = ModelFactory().skeleton(cfg)  # self-supervised: the only objective --init-from applies to
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(COPIED_PREFIXES)}


def _is_pos_embed(key: str) -> bool:
    return key.endswith("backbone.pos_embed")


def check_init_from(run_dir: str | Path, cfg: Config) -> Path | None:
    """The source of ``--init-from run_dir`` for a run of ``cfg``, after checking that its weights fit the
    architecture (position-embedding grids aside). Raises :class:`InitFromError`. Once the new run has a
    checkpoint of its own it resumes from it and ``run_dir`` is not read: nothing to check (None)."""
    if cfg.distill.enabled or cfg.train.objective != "dino":
        raise InitFromError("--init-from applies to self-supervised runs only, not distillation or copy detection")
    if Path(run_dir).resolve() == Path(cfg.train.output_dir).resolve():
        raise InitFromError(f"--init-from {run_dir} is this run's train.output_dir: give the phase its own directory")
    if newest_checkpoint(Path(cfg.train.output_dir) / "checkpoints") is not None:
        return None
    source = find_source(run_dir)
    _check_shapes(source, cfg)
    return source


def _check_shapes(source: Path, cfg: Config) -> None:
    have = _source_shapes(source)
    want = _target_shapes(cfg)
    if source.is_file():  # backbones only: the heads keep their initialisation
        want = {k: v for k, v in want.items() if ".backbone." in k}
    missing = sorted(set(want) - set(have))
    if missing:
        raise InitFromError(
            f"architecture mismatch: {len(missing)} weight(s) of this config are not in {source}, e.g. '{missing[0]}'"
        )
    for key, shape in want.items():
        found = have[key][0]
        if _is_pos_embed(key):
            fits = len(found) == 3 and found[2] == shape[2] and round((found[1] - 1) ** 0.5) ** 2 == found[1] - 1
        else:
            fits = found == shape
        if not fits:
            raise InitFromError(f"architecture mismatch: '{key}' is {list(found)} in {source} but {list(shape)} here")


def read_weights(source: Path) -> dict[str, Tensor]:
    """The student and teacher weights in ``source`` as full CPU tensors, keyed as in the meta-architecture."""
    if source.is_dir():
        state = {"model": {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in _source_shapes(source).items()}}
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(source))
        return state["model"]
    backbone = load_file(str(source))
    return {f"{net}backbone.{k}": v for net in COPIED_PREFIXES for k, v in backbone.items()}


def resample_pos_embeds(state: dict[str, Tensor], grid: int, mode: str) -> dict[str, Tensor]:
    """Every backbone position embedding of ``state`` on a ``grid × grid`` patch grid."""
    out = dict(state)
    for key, value in state.items():
        if _is_pos_embed(key) and value.shape[1] != 1 + grid * grid:
            out[key] = interpolate_pos_embed(value, grid, grid, mode).contiguous()
    return out


def init_from_run(model: nn.Module, cfg: Config, source: Path | None = None) -> Path:
    """Load the weights of ``cfg.train.init_from`` into ``model`` (the new run's meta-architecture, possibly
    sharded; every rank calls this). ``source``: what :func:`check_init_from` found and checked (None: find
    and check it here). Returns the source read."""
    if source is None:
        if cfg.distill.enabled or cfg.train.objective != "dino":
            raise InitFromError("--init-from applies to self-supervised runs only, not distillation or copy detection")
        source = find_source(cfg.train.init_from)
        _check_shapes(source, cfg)
    grid = cfg.model.img_size // cfg.model.patch_size
    mode = str(cfg.model.pos_embed_interpolation or "ours")
    state = resample_pos_embeds(read_weights(source), grid, mode)
    options = StateDictOptions(full_state_dict=True, strict=False)
    incompatible = set_model_state_dict(model, state, options=options)
    unexpected = [k for k in incompatible.unexpected_keys if k.startswith(COPIED_PREFIXES)]
    if unexpected:
        raise InitFromError(f"weights of {source} the model has no place for: {unexpected[:3]}")
    logger.info("initialised student, teacher%s from %s", " and heads" if source.is_dir() else " backbones", source)
    return source
