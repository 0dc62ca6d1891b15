"""Activation checkpointing → per-block ``torch.compile`` → FSDP2 ``fully_shard``, in one function.

:func:`parallelize` prepares the student and the teacher of a meta-architecture in place:

1. activation checkpointing on the student's blocks (``full``: every block; ``selective``: every
   second block — half the recomputation for about half the saving; the teacher never needs it);
2. the attention backend of every backbone resolved on its device (probed once, here, so that no
   compiled or checkpointed block ever probes or mutates the backend memo — dynamo would run it
   eagerly for good);
3. ``torch.compile`` of each block (student and teacher) when ``distributed.compile``, with
   ``fullgraph=True`` and static shapes, and a recompile budget per kind of block
   (:func:`compile_blocks`);
4. ``fully_shard`` of each block, then of the backbone and each head, then of the network (the root),
   for the student and the teacher alike, with a :class:`MixedPrecisionPolicy` from
   ``distributed.param_dtype`` / ``reduce_dtype`` (bf16 parameters, fp32 gradient reduction by
   default). Sharding applies when ``distributed.fsdp`` or more than one process.

Because the teacher is sharded exactly like the student, their local shards line up one to one and
the EMA update is a local ``torch._foreach`` over shards (``SSLMetaArch.update_ema``); the
teacher is resharded after its no-grad forward (``SSLMetaArch.teacher_targets``).
FSDP2 averages gradients over ranks in its reduce-scatter, so per-rank mean losses give the gradient
of the global-batch mean. :func:`clip_grad_norm` clips by the norm over all shards of all ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dinov2.config import DistributedConfig
from dinov2.distributed.env import DistEnv

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AC_MODES = ("none", "full", "selective")
RECOMPILES_PER_KIND = 8  # dynamo's default recompile_limit for one function, given to each kind of block


def _device_of(network: nn.Module, default: torch.device | None) -> torch.device:
    param = next(network.parameters(), None)
    return param.device if param is not None else (default or torch.device("cpu"))


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def mixed_precision_policy(cfg: DistributedConfig) -> MixedPrecisionPolicy:
    """FSDP2 policy: parameters all-gathered in ``param_dtype``, gradients reduced in ``reduce_dtype``."""
    return MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype), reduce_dtype=_dtype(cfg.reduce_dtype))


def should_shard(cfg: DistributedConfig, env: DistEnv) -> bool:
    return cfg.fsdp or env.distributed


def apply_activation_checkpointing(backbone: nn.Module, mode: str) -> None:
    """Mark ``backbone.blocks`` for recomputation in backward (``Block.checkpoint_activations``)."""
    if mode not in AC_MODES:
        raise ValueError(f"unknown distributed.activation_checkpointing '{mode}' (choose from {', '.join(AC_MODES)})")
    for i, block in enumerate(backbone.blocks):
        block.checkpoint_activations = mode == "full" or (mode == "selective" and i % 2 == 0)


def block_kind(block: nn.Module) -> tuple:
    """What a compiled block's graph is specialised on besides its input layout: its class, parameter
    shapes, stochastic depth and checkpointing (blocks of one kind share one graph)."""
    shapes = tuple(tuple(p.shape) for p in block.parameters())
    attrs = tuple(getattr(block, a, None) for a in ("drop_path", "drop_path_mode", "checkpoint_activations"))
    return (type(block).__qualname__, shapes, attrs, block.training)


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


def shard_network(network: nn.Module, policy: MixedPrecisionPolicy, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` every block, then every other child with parameters (backbone, heads), then
    ``network`` itself as the root (which owns whatever parameters are left)."""
    for block in network.backbone.blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for child in network.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(network, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def parallelize(model: nn.Module, cfg: DistributedConfig, env: DistEnv, device: torch.device | None = None) -> None:
    """Prepare every network of ``model`` (student, teacher, EMAs) in place (see the module docstring).

    ``model`` must already be on its device; sharding needs a process group (``setup_distributed``
    with ``always=cfg.fsdp``). ``device`` is accepted for symmetry with the trainer and unused.
    """
    for network in model.trained_networks().values():
        apply_activation_checkpointing(network.backbone, cfg.activation_checkpointing)
    for network in model.networks().values():  # probe now, never inside a compiled (checkpointed) block
        network.backbone.resolve_attention(_device_of(network, device))
    if cfg.compile:
        compile_blocks(list(model.networks().values()))
    if not should_shard(cfg, env):
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "FSDP needs a process group: create it with setup_distributed(..., always=cfg.distributed.fsdp)"
        )
    policy = mixed_precision_policy(cfg)
    for network in model.networks().values():  # student, teacher (+ the student EMA when distilling)
        shard_network(network, policy)


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients of ``module`` (over all shards of all ranks); the gradients
    are scaled down to ``max_norm`` when it is exceeded and ``max_norm > 0``. Returns the norm
    before clipping, a plain (replicated) tensor."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if hasattr(norm, "full_tensor"):  # a DTensor with a pending (partial) reduction over ranks
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.detach()
