"""The exported-backbone format evaluation reads: weights file + ``config.yaml`` side by side.

An export is a directory holding

- the backbone's ``state_dict()`` as ``*.safetensors`` (needs the ``safetensors`` package) or as a
  plain ``torch.save`` file (``*.pth`` / ``*.pt``), loadable with ``torch.load(weights_only=True)``;
- ``config.yaml``: the full training configuration (the :class:`dinov2.config.Config` schema), from
  which :func:`dinov2.models.build_backbone` rebuilds the architecture. An export ``{name}_backbone.*``
  with its own ``{name}_config.yaml`` beside it (an extra distilled student) is read with that one.

:func:`load_backbone` accepts the weights file or the directory (which must then hold one weights
file, or one whose name starts with ``teacher``, or ``student_backbone.*``). It also tolerates the
state dict of a wrapper: nested under a ``state_dict`` / ``model`` / ``backbone`` / ``teacher`` …
entry (``dinov2.interop``), keys prefixed ``backbone.`` (only those are kept), or ``module.`` /
``_orig_mod.`` prefixes from DDP and ``torch.compile``. :func:`save_backbone` writes the format.

A training checkpoint directory (``RUN/checkpoints/ckpt_N``: one DCP save, ``model.*`` keys) loads too: the
run's exported network (the EMA teacher; the EMA student when distilling) is read from its shards, with the
run's ``config.yaml`` two levels up. A run directory with no export yet evaluates its newest checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from dinov2.config import load_run_config, to_yaml
from dinov2.distributed.checkpoint_dir import (
    checkpoint_metadata,
    is_checkpoint,
    newest_checkpoint,
    quiet_single_process,
)
from dinov2.interop import read_state_dict as read_weights
from dinov2.models import build_backbone

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
CONFIG_NAME = "config.yaml"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_backbone(
    backbone: torch.nn.Module, cfg: Any, directory: str | os.PathLike, name: str = "backbone.pth"
) -> Path:
    """Write ``backbone``'s weights as ``directory/name`` (format from the suffix) and ``cfg`` as
    ``directory/config.yaml``; return the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix in (".pth", ".pt"):
        torch.save(state, path)
    else:
        raise ValueError(f"weights file name must end in one of {', '.join(WEIGHT_SUFFIXES)}: {name}")
    (directory / CONFIG_NAME).write_text(to_yaml(cfg))
    return path


def find_weights(path: str | os.PathLike) -> Path:
    """The weights file ``path`` names, or the one inside directory ``path``; a training checkpoint
    directory (or a run directory without an export: its newest checkpoint) is returned as it is."""
    path = Path(path)
    if path.is_file() or is_checkpoint(path):
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    for preferred in (
        [p for p in found if p.name.startswith("teacher")],
        [p for p in found if p.stem == "student_backbone"],
    ):
        if len(preferred) == 1:  # a pretraining run's teacher, a distillation run's main student
            return preferred[0]
    if not found and (newest := newest_checkpoint(path / "checkpoints")) is not None:
        return newest
    names = ", ".join(p.name for p in found) or "none"
    raise FileNotFoundError(f"expected one weights file ({'/'.join(WEIGHT_SUFFIXES)}) in {path}, found: {names}")


def config_of(weights: Path) -> Path:
    """The config file beside ``weights``: ``{name}_config.yaml`` for ``{name}_backbone.*`` when it exists
    (an extra distilled student), else ``config.yaml``."""
    if is_checkpoint(weights):  # RUN/checkpoints/ckpt_N
        return weights.parent.parent / CONFIG_NAME
    if weights.stem.endswith("_backbone"):
        own = weights.parent / f"{weights.stem.removesuffix('_backbone')}_config.yaml"
        if own.is_file():
            return own
    return weights.parent / CONFIG_NAME


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The backbone state dict stored in ``path`` (see the module docstring for what is unwrapped)."""
    state = read_weights(path)
    for prefix in _WRAPPER_PREFIXES:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def read_checkpoint_backbone(path: Path, backbone: torch.nn.Module, cfg: Any) -> None:
    """Load the run's exported network (see the module docstring) from checkpoint ``path`` into ``backbone``."""
    import torch.distributed.checkpoint as dcp  # lazy: ~0.7 s and ~700 modules; only training checkpoints need it

    saved = set(checkpoint_metadata(path))
    wanted = backbone.state_dict()
    prefixes = (["student_ema.backbone."] if cfg.distill.enabled else []) + ["teacher.backbone.", "student.backbone."]
    for prefix in prefixes:
        if all(f"model.{prefix}{k}" in saved for k in wanted):
            break
    else:
        raise ValueError(f"{path} holds no backbone of the shape its run config.yaml gives (another run?)")
    state = {"model": {prefix + k: v for k, v in wanted.items()}}
    with quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    backbone.load_state_dict({k.removeprefix(prefix): v for k, v in state["model"].items()})


def load_backbone(
    checkpoint: str | os.PathLike, config: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """``(backbone in eval mode on device, Config)`` from an export (see the module docstring).

    ``config`` defaults to ``config.yaml`` next to the weights file.
    """
    weights = find_weights(checkpoint)
    config_path = Path(config) if config is not None else config_of(weights)
    if not config_path.is_file():
        raise FileNotFoundError(f"no training config at {config_path} (pass --config to point at one)")
    cfg = load_run_config(config_path)
    backbone = build_backbone(cfg.model)
    if is_checkpoint(weights):
        read_checkpoint_backbone(weights, backbone, cfg)
        return backbone.to(device).eval(), cfg
    missing, unexpected = backbone.load_state_dict(read_state_dict(weights), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the backbone of {config_path}: "
            f"missing {sorted(missing)[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    return backbone.to(device).eval(), cfg
