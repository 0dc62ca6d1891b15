"""Export a backbone as plain weights (safetensors), loadable without our code or pickle.

Read them back with :func:`dinov2.eval.backbone_io.load_backbone` (weights + the run's config.yaml)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinov2.distributed.env import DistEnv
from dinov2.interop import EXPORT_FORMAT, POS_EMBED_METADATA_KEY


@dataclass(frozen=True)
class Export:
    """A backbone a finished run writes (``{name}_backbone.safetensors``) and evaluates. ``config``: the
    configuration to write beside it as ``{name}_config.yaml``, for a model the run's ``config.yaml`` does
    not describe (None: it does)."""

    name: str
    backbone: nn.Module
    config: Any = None

    @property
    def filename(self) -> str:
        return f"{self.name}_backbone.safetensors"


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 CPU state dict (gathers FSDP2 shards; every rank must call it)."""
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def export_backbone(backbone: nn.Module, path: str | Path, env: DistEnv) -> Path:
    """Write ``backbone``'s weights to ``path`` (``.safetensors``) on rank 0, atomically."""
    path = Path(path)
    state = full_state_dict(backbone)
    if env.is_main:
        tmp = path.with_suffix(path.suffix + ".tmp")
        metadata = {"format": EXPORT_FORMAT}
        mode = getattr(backbone, "pos_embed_interpolation", None)
        if mode is not None:  # read back by dinov2.interop.load_pretrained_backbone
            metadata[POS_EMBED_METADATA_KEY] = str(mode)
        save_file(state, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; the run's other files follow the umask
        tmp.replace(path)
    return path


def _umask() -> int:
    """The process umask (read by setting it, then put back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
