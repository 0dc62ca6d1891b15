"""Training checkpoints through ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``ckpt_{iteration:08d}/`` holding the DCP shards of the meta-architecture
(student, teacher, centering state) and the optimizer, ``meta.json`` (iteration, world size, the
global sample position of the data stream) and one ``rng_rank{r}.pt`` per rank (tensors only, read
with ``weights_only=True``). It is written to ``ckpt_….tmp`` and renamed when complete, so a crash
mid-save never leaves a directory that looks finished; only the newest ``keep`` are kept. DCP
reshards on load, so a checkpoint saved at one world size resumes at another.

Only finite states are written (:func:`state_is_finite` over the model and the optimizer: a finite loss
can come with overflowed AdamW moments, and such a checkpoint would fail again on every resume).
:meth:`CheckpointManager.resume` loads the newest checkpoint that reads back whole and finite; one that
does not (a truncated shard, a broken ``meta.json``, non-finite values) is logged with its path and the
reason, kept on disk for inspection, and the previous one is tried. A directory of the same name that a
new save would replace is moved aside to ``ckpt_….bad`` rather than deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException  # a BaseException: `except Exception` misses it
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinov2.distributed.comm import barrier, rank, world_size

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt_(\d{8})$")


@dataclass
class ResumeState:
    iteration: int
    sample_position: int
    world_size: int
    path: Path


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process when no process group exists; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _drop_unsaved_optimizer_state(optimizer_state: dict, path: Path) -> list[str]:
    """Forget the optimizer state of parameters the checkpoint has none for, in place.

    Parameters that never had a gradient before the save (the prototype layer while it is frozen)
    have no AdamW state in the checkpoint, but ``get_optimizer_state_dict`` creates one for every
    parameter of a fresh optimizer; they must stay state-less, as in the run that saved. Returns
    their names.
    """
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    per_param = optimizer_state.get("state", {})
    dropped = [
        name
        for name, fields in per_param.items()
        if any(f"optimizer.state.{name}.{field}" not in saved for field in fields)
    ]
    for name in dropped:
        del per_param[name]
    return dropped


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be resumed from (each one's reason is in the message)."""


class NonFiniteStateError(RuntimeError):
    """The model or optimizer state holds NaN/inf: it is not written."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_is_finite(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether every floating-point parameter, buffer and optimizer-state tensor is finite, on every rank."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers())]
    if optimizer is not None:
        tensors += [v for per_param in optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
    device = next(model.parameters()).device
    bad = torch.zeros((), device=device)
    for t in tensors:
        t = _local(t)
        if t.is_floating_point() and t.numel():
            bad += (~torch.isfinite(t.detach())).any().to(device)
    if world_size() > 1:
        dist.all_reduce(bad)
    return bool(bad.item() == 0)


def _first_line(error: BaseException) -> str:
    """The gist of ``error`` in one line; for DCP's per-rank wrapper, the underlying error (its last line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = lines[-1] if isinstance(error, CheckpointException) else lines[0]
    return line if len(line) <= 160 else line[:157] + "..."


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted((p for p in found if (p / "meta.json").is_file()), key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, iteration: int, model: nn.Module, optimizer: torch.optim.Optimizer, sample_position: int) -> Path:
        """Write checkpoint ``iteration``; NonFiniteStateError (nothing written) when the state is not finite."""
        if not state_is_finite(model, optimizer):
            raise NonFiniteStateError(f"the model or optimizer state is not finite at iteration {iteration}")
        final = self.directory / f"ckpt_{iteration:08d}"
        tmp = self.directory / f"ckpt_{iteration:08d}.tmp"
        this_rank = rank()
        if this_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        state = {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
        }
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=tmp)
        torch.save(rng_state(), tmp / f"rng_rank{this_rank}.pt")
        barrier()
        if this_rank == 0:
            meta = {"iteration": iteration, "sample_position": sample_position, "world_size": world_size()}
            (tmp / "meta.json").write_text(json.dumps(meta))
            if final.exists():  # one that failed to load (resume fell back past it): kept for inspection
                aside = final.with_name(final.name + ".bad")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
                logger.warning("moved the unreadable %s aside to %s", final, aside)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> ResumeState | None:
        """Load the newest checkpoint that reads back whole and finite (see the module docstring); None when
        there is none at all, CheckpointError when none of them loads."""
        failures: list[str] = []
        for path in reversed(self.complete()):
            try:
                state = self.load(path, model, optimizer)
                if not state_is_finite(model, optimizer):
                    raise NonFiniteStateError("it holds non-finite values")
            except (Exception, CheckpointException) as error:  # any defect: say which and why, try the previous one
                gist = _first_line(error)  # DCP's wrapper: already "RuntimeError: …" of the underlying error
                reason = gist if isinstance(error, CheckpointException) else f"{type(error).__name__}: {gist}"
                failures.append(f"{path} ({reason})")
                logger.warning("cannot resume from %s (%s); it is kept as it is, trying the previous one", path, reason)
                continue
            if failures:
                logger.warning("resuming from %s, the newest checkpoint that loads", path)
            return state
        if failures:
            raise CheckpointError(f"no checkpoint could be loaded: {'; '.join(failures)}")
        return None

    def load(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        restore_rng: bool = True,
    ) -> ResumeState:
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        state = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
            stateless = _drop_unsaved_optimizer_state(state["optimizer"], path)
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        if optimizer is not None:
            # strict=False only lets the state-less parameters stay so (see _drop_unsaved_optimizer_state)
            options = StateDictOptions(strict=not stateless)
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
        rng_file = path / f"rng_rank{rank()}.pt"
        if not restore_rng:
            pass
        elif meta["world_size"] == world_size() and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            logger.warning(
                "resuming at world size %d from a checkpoint saved at %d: RNG streams are re-seeded",
                world_size(),
                meta["world_size"],
            )
        return ResumeState(meta["iteration"], meta["sample_position"], meta["world_size"], path)
