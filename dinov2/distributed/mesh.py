"""The device mesh FSDP2 shards over: ``replicate × shard`` ranks (HSDP), from ``distributed.mesh``.

Parameters, gradients and optimizer state are sharded across the ``shard`` ranks of a group and
replicated across the ``replicate`` groups: a block's all-gather and its gradients' reduce-scatter
stay inside a group, and only the reduced gradient *shards* are all-reduced across groups once per
step. Ranks are laid out row-major (``rank = r · shard + s``), so a shard group is ``shard``
consecutive ranks — one node under torchrun and SLURM, which number a node's tasks consecutively.

Default (both sizes None): when the job spans several nodes of ``local_world_size`` processes each
(torchrun's ``LOCAL_WORLD_SIZE``, SLURM's tasks per node), shard within a node and replicate across
nodes; on one node, shard over every rank (plain FSDP, a 1-D mesh). Give one size and the other is
the world size divided by it.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dinov2.config import ConfigError, MeshConfig
from dinov2.distributed.env import DistEnv


def mesh_shape(cfg: MeshConfig, world_size: int, local_world_size: int) -> tuple[int, int]:
    """``(replicate, shard)`` with ``replicate · shard == world_size`` (see the module docstring)."""
    r, s = cfg.replicate, cfg.shard
    for key, value in (("replicate", r), ("shard", s)):
        if value is not None and value < 1:
            raise ConfigError(f"distributed.mesh.{key}={value} must be a positive number of ranks")
    if r is None and s is None:
        if 1 < local_world_size < world_size and world_size % local_world_size == 0:
            return world_size // local_world_size, local_world_size
        return 1, world_size
    if r is None:
        r = world_size // s if world_size % s == 0 else 0
    if s is None:
        s = world_size // r if world_size % r == 0 else 0
    if r * s != world_size:
        raise ConfigError(
            f"distributed.mesh {{replicate: {cfg.replicate}, shard: {cfg.shard}}} does not tile the "
            f"{world_size} processes (replicate × shard must equal the world size)"
        )
    return r, s


def build_mesh(cfg: MeshConfig, env: DistEnv, device: torch.device) -> DeviceMesh:
    """The mesh of this job: 1-D ``("shard",)`` when nothing is replicated, else 2-D
    ``("replicate", "shard")``. Every rank must call it (it creates the sub-groups)."""
    r, s = mesh_shape(cfg, env.world_size, env.local_world_size)
    device_type = "cuda" if device.type == "cuda" else "cpu"
    if r == 1:
        return init_device_mesh(device_type, (s,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (r, s), mesh_dim_names=("replicate", "shard"))


def shard_size(mesh: DeviceMesh) -> int:
    """Ranks one parameter is sharded over (the last mesh dimension)."""
    return mesh.size(mesh.ndim - 1)


def shard_rows(rows: int, shards: int, index: int) -> int:
    """Rows of shard ``index`` of ``rows`` rows cut in ``shards`` (torch.chunk, FSDP2's layout)."""
    chunk = -(-rows // shards)
    return max(min(chunk, rows - index * chunk), 0)


def local_numel(shape: tuple[int, ...], shards: int, index: int = 0) -> int:
    """Elements of a parameter of ``shape`` on shard ``index`` of ``shards`` (a 0-d tensor is one row)."""
    rows = shape[0] if shape else 1
    return shard_rows(rows, shards, index) * (math.prod(shape) // max(rows, 1))
