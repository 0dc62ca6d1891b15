"""Apply activation checkpointing → ``torch.compile`` → FSDP2 ``fully_shard`` in one place.

For the student and the teacher alike: each transformer block is (optionally) wrapped for activation
checkpointing, (optionally) compiled, then sharded; then the backbone and each head are sharded as
their own units. Mixed precision follows ``distributed.param_dtype`` / ``reduce_dtype``. The teacher
is sharded exactly like the student so that the EMA update is a local operation on shards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dinov2.config import DistributedConfig
from dinov2.distributed.env import DistEnv

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def wrap_blocks(backbone: nn.Module, activation_checkpointing: str, compile_blocks: bool) -> None:
    """Activation checkpointing and per-block compilation, in place on ``backbone.blocks``."""
    if activation_checkpointing not in ("none", "full", "selective"):
        raise ValueError(f"unknown activation_checkpointing '{activation_checkpointing}'")
    for i, block in enumerate(backbone.blocks):
        # "selective": every other block, trading half the recomputation for half the memory saving
        block.checkpoint_activations = activation_checkpointing == "full" or (
            activation_checkpointing == "selective" and i % 2 == 0
        )
        if compile_blocks:
            block.compile()


def shard_network(network: nn.Module, policy: MixedPrecisionPolicy, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` every block, then the backbone, then each head."""
    for block in network.backbone.blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(network.backbone, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for head in (network.dino_head, network.ibot_head):
        if head is not None:
            fully_shard(head, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def parallelize_meta_arch(model: nn.Module, cfg: DistributedConfig, env: DistEnv, device: torch.device) -> None:
    """Wrap ``model.student`` and ``model.teacher`` in place (see the module docstring)."""
    wrap_blocks(model.student.backbone, cfg.activation_checkpointing, cfg.compile)
    wrap_blocks(model.teacher.backbone, "none", cfg.compile)
    if not (cfg.fsdp or env.distributed):
        return
    policy = MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype), reduce_dtype=_dtype(cfg.reduce_dtype))
    shard_network(model.student, policy)
    shard_network(model.teacher, policy)


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all shards), clipped to ``max_norm`` when ``max_norm > 0``."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.detach()
