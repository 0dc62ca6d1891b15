"""Where this process sits in the job: rank, local rank and world size from torchrun or SLURM.

One function reads the environment (:func:`read_env`); :func:`setup_distributed` creates the process
group when there is more than one process (NCCL on GPU, gloo on CPU) and
:func:`shutdown_distributed` destroys it. Nothing is stored at module level.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    source: str = "single"  # single | torchrun | slurm
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # "node[3-5,7]" -> "node3"; "a,b" -> "a"
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return head


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """torchrun's variables win; otherwise SLURM's (one task per process); otherwise one process."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            world_size=int(environ["WORLD_SIZE"]),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", 1)),
            source="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        ntasks_per_node = environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0].split(",")[0]
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            world_size=int(environ["SLURM_NTASKS"]),
            local_world_size=int(ntasks_per_node) if ntasks_per_node.isdigit() else 1,
            source="slurm",
        )
    return DistEnv()


def _slurm_rendezvous(environ: dict[str, str]) -> None:
    """MASTER_ADDR / MASTER_PORT for a SLURM job that was not started by torchrun."""
    if "MASTER_ADDR" not in environ:
        environ["MASTER_ADDR"] = _first_slurm_host(environ.get("SLURM_JOB_NODELIST", "localhost"))
    if "MASTER_PORT" not in environ:
        job = int(environ.get("SLURM_JOB_ID", "0"))
        environ["MASTER_PORT"] = str(20000 + job % 20000)


def setup_distributed(backend: str = "auto") -> DistEnv:
    """Read the environment and, for more than one process, initialise the default process group."""
    env = read_env()
    if not env.distributed or (dist.is_available() and dist.is_initialized()):
        return env
    if env.source == "slurm":
        _slurm_rendezvous(os.environ)  # type: ignore[arg-type]
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    logger.info("process group up: rank %d of %d (%s, %s)", env.rank, env.world_size, backend, env.source)
    return DistEnv(env.rank, env.local_rank, env.world_size, env.local_world_size, env.source, True)


def shutdown_distributed(env: DistEnv) -> None:
    if env.owns_process_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
