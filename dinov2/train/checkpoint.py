"""Training checkpoints: one ``torch.distributed.checkpoint`` (DCP) save per checkpoint.

A checkpoint is a directory ``ckpt_{iteration:08d}/`` holding one DCP save of four entries:

- ``model``: the meta-architecture (student, teacher, centering state), a :class:`ModelState`;
- ``optimizer``: its optimizer, an :class:`OptimizerState`;
- ``progress``: ``iteration``, ``sample_position`` (the global position of the data stream) and the
  ``world_size`` that saved it, as 0-d int64 tensors (no pickled objects to read back);
- ``rng``: a :class:`RngState`, one key per rank (``rng.rank{r}.cpu``, ``rng.rank{r}.cuda`` when CUDA
  is in use), each rank writing only its own.

``model`` and ``optimizer`` are :class:`~torch.distributed.checkpoint.stateful.Stateful`: DCP asks them
for their state dict (``get_model_state_dict`` / ``get_optimizer_state_dict``) and hands the loaded one
back (``set_…``). DCP reshards on load, so a checkpoint saved at one world size resumes at another; the
RNG streams are then re-seeded instead of restored. The directory is written as ``ckpt_….tmp`` and
renamed when complete (DCP's ``.metadata`` is written last), so a crash mid-save never leaves a
directory that looks finished; only the newest ``keep`` are kept.

Only finite states are written (:func:`state_is_finite` over the model and the optimizer: a finite loss
can come with overflowed AdamW moments, and such a checkpoint would fail again on every resume).
:meth:`CheckpointManager.resume` loads the newest checkpoint that reads back whole and finite; one that
does not (a truncated shard, a missing entry, non-finite values) is logged with its path and the
reason, kept on disk for inspection, and the previous one is tried. A directory of the same name that a
new save would replace is moved aside to ``ckpt_….bad`` rather than deleted.

Checkpoints of the earlier layout (the same DCP ``model`` / ``optimizer`` entries, with the progress in a
``meta.json`` and the RNG states in ``rng_rank{r}.pt`` files beside them) still load: see
:func:`_read_legacy_progress`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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
from torch.distributed.checkpoint.stateful import Stateful

from dinov2.distributed.checkpoint_dir import (
    checkpoint_metadata,
    checkpoint_name,
    finished_checkpoints,
    newest_checkpoint,
    quiet_single_process,
)
from dinov2.distributed.comm import barrier, rank, world_size
from dinov2.distributed.meta_init import local_shard

logger = logging.getLogger(__name__)
_PROGRESS = ("iteration", "sample_position", "world_size")


@dataclass
class ResumeState:
    iteration: int
    sample_position: int
    world_size: int
    path: Path


def rng_state() -> dict[str, torch.Tensor]:
    """This process's generators: the CPU one, and the current CUDA device's once CUDA is in use."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def saved_keys(path: str | Path) -> set[str]:
    """The flattened keys of the DCP save in ``path`` (``model.teacher.backbone.cls_token``, ``progress.iteration``)."""
    return set(checkpoint_metadata(path))


class ModelState(Stateful):
    """The model as a DCP entry (``get_model_state_dict``: full keys, resharded on load)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    """The optimizer as a DCP entry. For a load, ``saved`` holds the checkpoint's keys: parameters that
    never had a gradient before the save (a head whose loss weight is 0; an older checkpoint's frozen
    prototype layer) have no AdamW state there, but ``get_optimizer_state_dict`` makes one for every
    parameter of a fresh optimizer; they are left out of what is read and stay state-less, as in the
    run that saved."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: set[str] | None = None) -> None:
        self.model, self.optimizer, self.saved = model, optimizer, saved
        self.stateless: list[str] = []

    def state_dict(self) -> dict:
        state = get_optimizer_state_dict(self.model, self.optimizer)
        if self.saved is not None:
            per_param = state.get("state", {})
            self.stateless = [
                name
                for name, fields in per_param.items()
                if any(f"optimizer.state.{name}.{field}" not in self.saved for field in fields)
            ]
            for name in self.stateless:
                del per_param[name]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # strict=False only lets the state-less parameters stay so
        options = StateDictOptions(strict=not self.stateless)
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=options)


class RngState(Stateful):
    """This rank's generators as a DCP entry under ``rank{r}``: each rank writes and reads only its own.
    For a load, ``saved`` (the checkpoint's keys) leaves out a CUDA state the checkpoint has none of."""

    def __init__(self, saved: set[str] | None = None) -> None:
        self.saved = saved

    def state_dict(self) -> dict:
        name = f"rank{rank()}"
        if self.saved is None:
            return {name: rng_state()}
        state = {"cpu": torch.get_rng_state()}
        if f"rng.{name}.cuda" in self.saved and torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return {name: state}

    def load_state_dict(self, state_dict: dict) -> None:
        set_rng_state(state_dict[f"rank{rank()}"])


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be resumed from (each one's reason is in the message)."""


class NonFiniteStateError(RuntimeError):
    """The model or optimizer state holds NaN/inf: it is not written."""



def state_is_finite(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether every floating-point parameter, buffer and optimizer-state tensor is finite, on every rank."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers())]
    if optimizer is not None:
        tensors += [v for per_param in optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
    device = next(model.parameters()).device
    bad = torch.zeros((), device=device)
    for t in tensors:
        t = local_shard(t)
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


def _read_legacy_progress(path: Path) -> dict[str, int]:
    """The progress of a checkpoint of the earlier layout, from its ``meta.json``."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} has no progress entry (progress.iteration) and no meta.json")
    meta = json.loads(meta_file.read_text())
    return {key: int(meta[key]) for key in _PROGRESS}


def read_progress(path: str | Path, keys: set[str] | None = None) -> dict[str, int]:
    """``{iteration, sample_position, world_size}`` of checkpoint ``path`` (collective under a process group)."""
    path = Path(path)
    keys = saved_keys(path) if keys is None else keys
    if "progress.iteration" not in keys:
        return _read_legacy_progress(path)
    progress = {key: torch.zeros((), dtype=torch.int64) for key in _PROGRESS}
    with quiet_single_process():
        dcp.load({"progress": progress}, checkpoint_id=path)
    return {key: int(value) for key, value in progress.items()}


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        return finished_checkpoints(self.directory)

    def latest(self) -> Path | None:
        return newest_checkpoint(self.directory)

    def save(self, iteration: int, model: nn.Module, optimizer: torch.optim.Optimizer, sample_position: int) -> Path:
        """Write checkpoint ``iteration``; NonFiniteStateError (nothing written) when the state is not finite."""
        if not state_is_finite(model, optimizer):
            raise NonFiniteStateError(f"the model or optimizer state is not finite at iteration {iteration}")
        final = self.directory / checkpoint_name(iteration)
        tmp = self.directory / f"{checkpoint_name(iteration)}.tmp"
        this_rank = rank()
        if this_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        progress = {"iteration": iteration, "sample_position": sample_position, "world_size": world_size()}
        state = {
            "model": ModelState(model),
            "optimizer": OptimizerState(model, optimizer),
            "progress": {key: torch.tensor(value, dtype=torch.int64) for key, value in progress.items()},
            "rng": RngState(),
        }
        with quiet_single_process():
            dcp.save(state, checkpoint_id=tmp)
        barrier()
        if this_rank == 0:
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
        saved = saved_keys(path)
        progress = read_progress(path, saved)
        legacy = "progress.iteration" not in saved
        rng_file = path / f"rng_rank{rank()}.pt"  # the earlier layout's
        rng_saved = rng_file.is_file() if legacy else f"rng.rank{rank()}.cpu" in saved
        rng_applies = restore_rng and progress["world_size"] == world_size() and rng_saved
        state: dict[str, Stateful] = {"model": ModelState(model)}
        if optimizer is not None:
            state["optimizer"] = OptimizerState(model, optimizer, saved)
        if rng_applies and not legacy:
            state["rng"] = RngState(saved)
        with quiet_single_process():
            dcp.load(state, checkpoint_id=path)
        if rng_applies and legacy:
            set_rng_state(torch.load(rng_file, weights_only=True))
        if restore_rng and not rng_applies and progress["world_size"] == world_size():
            logger.warning("%s holds no RNG state of rank %d: its RNG streams are re-seeded", path, rank())
        elif restore_rng and not rng_applies:
            logger.warning(
                "resuming at world size %d from a checkpoint saved at %d: RNG streams are re-seeded",
                world_size(),
                progress["world_size"],
            )
        return ResumeState(progress["iteration"], progress["sample_position"], progress["world_size"], path)
