"""Where a training run's checkpoints are on disk, for every reader: the trainer
(``dinov2.train.checkpoint`` writes and resumes them), ``--init-from``, distillation and ``dinov2-eval``.

A checkpoint is a directory ``ckpt_{iteration:08d}`` holding one DCP save; DCP writes its ``.metadata``
file last, so a directory with it is finished. Reading one in a single process (no process group) is
intended: :func:`quiet_single_process` silences DCP's warning about it.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHECKPOINT_NAME = re.compile(r"^ckpt_(\d{8,})$")


def checkpoint_name(iteration: int) -> str:
    return f"ckpt_{iteration:08d}"


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a finished checkpoint directory: ``ckpt_N`` holding DCP's ``.metadata``."""
    path = Path(path)
    return bool(CHECKPOINT_NAME.match(path.name)) and (path / ".metadata").is_file()


def finished_checkpoints(directory: str | Path) -> list[Path]:
    """The finished checkpoints in ``directory`` (a run's ``checkpoints/``), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def newest_checkpoint(directory: str | Path) -> Path | None:
    """The newest finished checkpoint in ``directory``, or None."""
    found = finished_checkpoints(directory)
    return found[-1] if found else None


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """``{flattened key: its DCP metadata (size, dtype)}`` of the save in checkpoint ``path``
    (``model.teacher.backbone.cls_token``, ``progress.iteration``, ``rng.rank0.cpu`` …)."""
    import torch.distributed.checkpoint as dcp  # lazy: ~0.7 s, and dinov2-eval reads a checkpoint rarely

    return dict(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes a single process when no process group exists; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
