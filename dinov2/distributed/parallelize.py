"""Activation checkpointing → per-block ``torch.compile`` → FSDP2 ``fully_shard``, in one function.

:func:`parallelize` prepares the student and the teacher of a meta-architecture in place:

1. activation checkpointing on the student's blocks (``full``: every block; ``selective``: every
   second block — half the recomputation for about half the saving; the teacher never needs it):
   each chosen block's ``forward`` is wrapped in ``torch.utils.checkpoint.checkpoint``
   (:func:`apply_activation_checkpointing`; the block itself knows nothing about it);
2. the attention backend of every backbone resolved on its device (probed once, here, so that no
   compiled or checkpointed block ever probes or mutates the backend memo — dynamo would run it
   eagerly for good);
3. ``torch.compile`` of each block (student and teacher) when ``distributed.compile``, with
   ``fullgraph=True`` and static shapes, and a recompile budget per kind of block
   (:func:`compile_blocks`);
4. ``fully_shard`` of each block, then of the backbone and each head, then of the network (the root),
   for the student and the teacher alike, over the device mesh of ``distributed.mesh`` (1-D: FSDP;
   2-D ``replicate × shard``: HSDP, ``dinov2.distributed.mesh``), with a :class:`MixedPrecisionPolicy`
   from ``distributed.param_dtype`` / ``reduce_dtype`` (bf16 parameters, fp32 gradient reduction by
   default), ``reshard_after_forward`` per network and explicit forward/backward prefetch of the
   next blocks' all-gathers (``distributed.*_reshard_after_forward``, ``*_prefetch``; defaults
   argued in docs/launch.md). Sharding applies when ``distributed.fsdp`` or more than one process.

The networks may still be on the meta device (``dinov2.distributed.meta_init`` builds, shards, then
materialises and initialises shard by shard); nothing here reads parameter values.

Because the teacher is sharded exactly like the student, their local shards line up one to one and
the EMA update is a local ``torch._foreach`` over shards (``SSLMetaArch.update_ema``); the
teacher is resharded after its no-grad forward (``SSLMetaArch.teacher_targets``).
FSDP2 averages gradients over ranks in its reduce-scatter, so per-rank mean losses give the gradient
of the global-batch mean. :func:`clip_grad_norm` clips by the norm over all shards of all ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MethodType
from typing import Any, get_args

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from dinov2.config import ActivationCheckpointing, DistributedConfig
from dinov2.distributed.env import DistEnv
from dinov2.distributed.mesh import build_mesh

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AC_MODES = get_args(ActivationCheckpointing)
RECOMPILES_PER_KIND = 8  # dynamo's default recompile_limit for one function, given to each kind of block


def _device_of(network: nn.Module) -> torch.device:
    param = next(network.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def mixed_precision_policy(cfg: DistributedConfig) -> MixedPrecisionPolicy:
    """FSDP2 policy: parameters all-gathered in ``param_dtype``, gradients reduced in ``reduce_dtype``."""
    return MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype), reduce_dtype=_dtype(cfg.reduce_dtype))


def should_shard(cfg: DistributedConfig, env: DistEnv) -> bool:
    return cfg.fsdp or env.distributed


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of a checkpointed block: its class's ``forward`` under
    ``torch.utils.checkpoint.checkpoint`` (non-reentrant) when training with gradients, plainly
    otherwise. The activations inside the block are recomputed in backward; the RNG state is replayed,
    so the recomputation draws the same stochastic-depth subset. Under ``torch.compile`` dynamo traces
    the checkpoint as a higher-order op inside the block's graph (no graph break)."""
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def is_checkpointed(block: nn.Module) -> bool:
    """Whether :func:`apply_activation_checkpointing` wrapped ``block``'s forward."""
    forward = block.__dict__.get("forward")
    return isinstance(forward, MethodType) and forward.__func__ is _checkpointed_forward


def apply_activation_checkpointing(backbone: nn.Module, mode: str) -> None:
    """Recompute the activations of ``backbone.blocks`` in backward: ``full``, every block;
    ``selective``, blocks 0, 2, 4, …; ``none``, no block. Applying a mode replaces the previous one.

    The wrapper is an instance-level ``forward`` (:func:`_checkpointed_forward` bound to the block),
    which ``nn.Module.__call__`` — and ``Module.compile``'s compiled call — finds before the class's.
    Not a wrapper module (torchtitan's ``checkpoint_wrapper``, from a private torch module): that would
    insert ``_checkpoint_wrapped_module`` into every parameter name, and the names are what the
    checkpoints, the exports, the optimizer's parameter groups and the teacher/student pairing read;
    here the module tree, parameter names and ``state_dict`` keys stay exactly those of the unwrapped
    model. The block's hooks (FSDP2's all-gather, forward hooks) still run around the checkpointed
    forward, and ``copy.deepcopy`` rebinds the wrapper to the copy."""
    chosen = set(checkpointed_blocks(mode, len(backbone.blocks)))
    for i, block in enumerate(backbone.blocks):
        block.__dict__.pop("forward", None)
        if i in chosen:
            block.forward = MethodType(_checkpointed_forward, block)


def checkpointed_blocks(mode: str, depth: int) -> list[int]:
    """The indices of the blocks ``mode`` checkpoints: none, every second one from the first
    (``selective``), or all (``full``); the memory plan counts the same ones."""
    if mode not in AC_MODES:
        raise ValueError(f"unknown distributed.activation_checkpointing '{mode}' (choose from {', '.join(AC_MODES)})")
    return {"none": [], "selective": list(range(0, depth, 2)), "full": list(range(depth))}[mode]


def block_kind(block: nn.Module) -> tuple:
    """What a compiled block's graph is specialised on besides its input layout: its class, parameter
    shapes, stochastic depth and checkpointing (blocks of one kind share one graph)."""
    shapes = tuple(tuple(p.shape) for p in block.parameters())
    attrs = tuple(getattr(block, a, None) for a in ("drop_path", "drop_path_mode"))
    return (type(block).__qualname__, shapes, attrs, is_checkpointed(block), block.training)


def compile_blocks(networks: Sequence[nn.Module]) -> int:
    """``torch.compile`` every block of every backbone in place: ``fullgraph=True`` (a graph break is an
    error, not a silent eager fallback) and static shapes (one graph per packed layout; a training run
    has one layout per network, so nothing turns dynamic).

    All compiled modules run through one code object (``nn.Module._call_impl``), and dynamo caps the
    graphs one code object may hold (``recompile_limit``, default 8) — about 8 for *all* blocks of all
    networks together, which non-uniform drop path at depth 12 or several distillation students exceed
    (the rest then runs eagerly, silently). So each distinct kind of block (:func:`block_kind`) gets the
    budget dynamo gives one function: the limits are raised to ``kinds × 8`` (never lowered). Returns the
    number of kinds."""
    kinds = {block_kind(block) for network in networks for block in network.backbone.blocks}
    budget = len(kinds) * RECOMPILES_PER_KIND
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, budget)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, budget)
    for network in networks:
        for block in network.backbone.blocks:
            block.compile(fullgraph=True, dynamic=False)
    return len(kinds)


def shard_network(
    network: nn.Module,
    policy: MixedPrecisionPolicy,
    mesh: DeviceMesh | None = None,
    reshard_after_forward: bool = True,
    forward_prefetch: int = 0,
    backward_prefetch: int = 0,
) -> None:
    """``fully_shard`` every block, then every other child with parameters (backbone, heads), then
    ``network`` itself as the root (which owns whatever parameters are left), over ``mesh`` (1-D: FSDP,
    2-D: HSDP; None: the default group). Then the explicit prefetch: each block issues the all-gather
    of the next ``forward_prefetch`` blocks when its forward starts, and of the previous
    ``backward_prefetch`` blocks (the next ones in backward) when its backward starts."""
    blocks = list(network.backbone.blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for child in network.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(network, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for i, block in enumerate(blocks):
        ahead = blocks[i + 1 : i + 1 + forward_prefetch]
        if ahead:
            block.set_modules_to_forward_prefetch(ahead)
        behind = blocks[max(i - backward_prefetch, 0) : i][::-1]
        if behind:
            block.set_modules_to_backward_prefetch(behind)


def network_sharding(cfg: DistributedConfig, trained: bool) -> dict:
    """``shard_network`` keyword arguments of one network: trained networks (students) take the student
    settings; the teacher and the EMAs (no backward) the teacher's reshard choice and no backward prefetch."""
    if trained:
        return dict(
            reshard_after_forward=cfg.student_reshard_after_forward,
            forward_prefetch=cfg.forward_prefetch,
            backward_prefetch=cfg.backward_prefetch,
        )
    return dict(reshard_after_forward=cfg.teacher_reshard_after_forward, forward_prefetch=cfg.forward_prefetch)


def parallelize(
    model: nn.Module,
    cfg: DistributedConfig,
    env: DistEnv,
    device: torch.device | None = None,
    mesh: DeviceMesh | None = None,
) -> DeviceMesh | None:
    """Prepare every network of ``model`` (student, teacher, EMAs) in place (see the module docstring).

    ``model`` may be on its device or on the meta device (``dinov2.distributed.meta_init``: shard first,
    materialise after); the attention backend is resolved on ``device`` (default: the parameters'
    device). Sharding needs a process group (``setup_distributed`` with ``always=cfg.fsdp``) and uses
    ``mesh`` (default: :func:`dinov2.distributed.mesh.build_mesh` from ``cfg.mesh``). A network that is
    already sharded (a distillation teacher loaded shard by shard) is left as it is. Returns the mesh
    (None when nothing is sharded).
    """
    for network in model.trained_networks().values():
        apply_activation_checkpointing(network.backbone, cfg.activation_checkpointing)
    for network in model.networks().values():  # probe now, never inside a compiled (checkpointed) block
        network.backbone.resolve_attention(device if device is not None else _device_of(network))
    if cfg.compile:
        compile_blocks(list(model.networks().values()))
    if not should_shard(cfg, env):
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "FSDP needs a process group: create it with setup_distributed(..., always=cfg.distributed.fsdp)"
        )
    if mesh is None:
        mesh = build_mesh(cfg.mesh, env, device if device is not None else _device_of(model))
    policy = mixed_precision_policy(cfg)
    trained = set(model.trained_networks())
    for name, network in model.networks().items():  # student, teacher (+ the student EMA when distilling)
        if not isinstance(network, FSDPModule):
            shard_network(network, policy, mesh, **network_sharding(cfg, name in trained))
    return mesh


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients of ``module`` (over all shards of all ranks); the gradients
    are scaled down to ``max_norm`` when it is exceeded and ``max_norm > 0``. Returns the norm
    before clipping, a plain (replicated) tensor."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:  # no gradient (a loss weight of 0): a zero norm where the module's parameters live
        return torch.zeros((), device=next((p.device for p in module.parameters()), torch.device("cpu")))
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if hasattr(norm, "full_tensor"):  # a DTensor with a pending (partial) reduction over ranks
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.detach()
