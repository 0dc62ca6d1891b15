"""Where this process sits in the job, and the process group's life cycle.

:func:`read_env` is the one place that reads rank, local rank and world size — from torchrun's
variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``…), else from a SLURM job step's (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``…), else one process. :func:`setup_distributed` creates the
default process group (NCCL on GPU, gloo on CPU) when there is more than one process, or at world
size 1 when asked (FSDP needs a group even then); :func:`shutdown_distributed` destroys it, and
:func:`distributed_session` does both around a block. Nothing is stored at module level: the state
is the returned :class:`DistEnv` and torch's own default group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import get_args

import torch
import torch.distributed as dist

from dinov2.config import DistBackend

logger = logging.getLogger(__name__)

BACKENDS = get_args(DistBackend)


@dataclass(frozen=True)
class DistEnv:
    """Rank and sizes of this process; ``backend`` and ``owns_process_group`` once a group is up."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    source: str = "single"  # single | torchrun | slurm
    backend: str | None = None  # nccl | gloo once a process group exists
    owns_process_group: bool = False  # True when setup_distributed created the group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def has_process_group(self) -> bool:
        return self.backend is not None


# ------------------------------------------------------------------------------------------ reading
def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _tasks_on_first_node(tasks_per_node: str) -> int:
    """SLURM's compressed ``2(x3),1`` / ``4`` task-count lists: the count of the first node."""
    match = re.match(r"\s*(\d+)", tasks_per_node)
    return int(match.group(1)) if match else 1


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank / local rank / world size of this process.

    torchrun's variables win (so ``srun torchrun …`` works); otherwise those of a SLURM *job step*
    (one task per process, as ``srun`` starts them — the batch script itself, which has
    ``SLURM_PROCID`` but no step, is one process); otherwise a single process.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = _int(environ, "WORLD_SIZE")
        return _checked(
            DistEnv(
                rank=_int(environ, "RANK"),
                local_rank=_int(environ, "LOCAL_RANK", 0),
                world_size=world,
                local_world_size=_int(environ, "LOCAL_WORLD_SIZE", world),
                source="torchrun",
            )
        )
    if "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ):
        world = _int(environ, "SLURM_STEP_NUM_TASKS", _int(environ, "SLURM_NTASKS", 1))
        per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1"
        return _checked(
            DistEnv(
                rank=_int(environ, "SLURM_PROCID"),
                local_rank=_int(environ, "SLURM_LOCALID", 0),
                world_size=world,
                local_world_size=_tasks_on_first_node(per_node),
                source="slurm",
            )
        )
    return DistEnv()


def _checked(env: DistEnv) -> DistEnv:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"rank {env.rank} is not in [0, world size {env.world_size}) ({env.source} variables)")
    if env.local_rank < 0:
        raise ValueError(f"negative local rank {env.local_rank} ({env.source} variables)")
    return env


# ------------------------------------------------------------------------------------- rendezvous
def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` when there, else parsed.

    ``node[003-005,7],gpu1`` → ``node003``; ``a,b`` → ``a``.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        )
        hosts = out.stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    if head is None or not head.group(1) and not head.group(3):
        return "localhost"
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_rendezvous(environ: Mapping[str, str]) -> tuple[str, int]:
    """``(address, port)`` of rank 0's TCP store in a SLURM job that torchrun did not start.

    ``MASTER_ADDR`` / ``MASTER_PORT`` win when set; otherwise the job's first node and a port in
    [20000, 40000) derived from the job id and ``SLURM_RESTART_COUNT``: the same for every task of one
    run, different between jobs and between the runs of a requeued job (a straggler of the previous
    run may still hold the old port).
    """
    addr = environ.get("MASTER_ADDR") or first_host(
        environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
    )
    if environ.get("MASTER_PORT"):
        return addr, _int(environ, "MASTER_PORT")
    run = f"{environ.get('SLURM_JOB_ID', '0')}.{environ.get('SLURM_RESTART_COUNT', '0')}"
    return addr, 20000 + zlib.crc32(run.encode()) % 20000


# -------------------------------------------------------------------------------------- lifecycle
def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("distributed.backend=nccl needs a CUDA GPU; use gloo (or auto) on CPU")
    return backend


def cuda_device_index(env: DistEnv) -> int:
    """The GPU of this process: its local rank, wrapped when fewer GPUs are visible (one per task)."""
    count = torch.cuda.device_count()
    return env.local_rank % count if count else 0


def setup_distributed(
    backend: str = "auto",
    *,
    always: bool = False,
    timeout: timedelta | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistEnv:
    """Read the environment and initialise the default process group when it is needed.

    A group is created for more than one process, and for a single process when ``always`` (FSDP2
    shards over a group even at world size 1; that group lives in memory, no port is opened). When a
    group already exists (a caller made one), it is used as is and left for that caller to destroy.
    """
    env = read_env(environ)
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(
                f"a process group already exists with rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the environment says rank {env.rank} of {env.world_size}"
            )
        return replace(env, backend=dist.get_backend(), owns_process_group=False)
    if not (env.distributed or always):
        return env
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    backend = resolve_backend(backend)
    kwargs: dict = {"backend": backend, "rank": env.rank, "world_size": env.world_size}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if backend == "nccl":
        device = torch.device("cuda", cuda_device_index(env))
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    if not env.distributed:
        kwargs["store"] = dist.HashStore()
    elif env.source == "slurm":
        addr, port = slurm_rendezvous(os.environ if environ is None else environ)
        kwargs["init_method"] = f"tcp://{addr}:{port}"
    else:
        kwargs["init_method"] = "env://"  # torchrun's MASTER_ADDR / MASTER_PORT
    dist.init_process_group(**kwargs)
    logger.info("process group up: rank %d of %d (%s, from %s)", env.rank, env.world_size, backend, env.source)
    return replace(env, backend=backend, owns_process_group=True)


def shutdown_distributed(env: DistEnv, barrier: bool = True) -> None:
    """Destroy the process group if :func:`setup_distributed` created it.

    ``barrier``: wait for every rank first (skipped after an error, when a peer may never arrive).
    """
    if not (env.owns_process_group and dist.is_available() and dist.is_initialized()):
        return
    try:
        if barrier and env.distributed:
            dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(backend: str = "auto", *, always: bool = False) -> Iterator[DistEnv]:
    """``with distributed_session(...) as env:`` — set up, and shut down cleanly even on errors."""
    env = setup_distributed(backend, always=always)
    try:
        yield env
    except BaseException:
        shutdown_distributed(env, barrier=False)
        raise
    shutdown_distributed(env)
