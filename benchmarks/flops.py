"""FLOPs: the counter (``torch.utils.flop_counter`` plus the CPU attention kernels it does not know)
and the analytic formulas of one training step, read from the model configuration."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dinov2.layers.mlp import swiglu_hidden_dim
from dinov2.layers.stochastic_depth import kept_samples

ATEN = torch.ops.aten

def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, n, d = query_shape
    s, dv = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * n * s * (d + dv)  # QKᵀ and PV


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_forward_flops(query_shape, key_shape, value_shape)  # dV, dP, dQ, dK


# torch counts the CUDA SDPA kernels; the CPU flash kernel is not in its table, so add it here
CPU_SDPA_FLOPS = {
    ATEN._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward_flops,
    ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul/conv/attention FLOPs executed by ``fn()`` (``torch.utils.flop_counter``)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def backbone_forward_flops(model_cfg: Any, groups: Sequence[tuple[int, int]], training: bool) -> int:
    """Forward FLOPs of our ViT over crop groups ``(batch, image side)``.

    Per block and sample of ``n`` tokens, width ``D``: attention branch ``8·n·D²`` (QKV ``6nD²`` +
    projection ``2nD²``) + ``4·n²·D`` (QKᵀ and PV); FFN branch ``4·n·D·h`` (MLP, ``h = ratio·D``) or
    ``6·n·D·h`` (SwiGLU, ``h`` from :func:`swiglu_hidden_dim`). Under efficient stochastic depth each
    branch runs on ``max(1, ⌊b·(1−p)⌋)`` of a group's ``b`` samples. Plus the patch embedding
    ``2·P·(3·p²)·D`` per sample of ``P`` patches. Norms, softmax and adds are not counted."""
    model_cfg = model_cfg.resolved()
    d, depth, ffn = model_cfg.embed_dim, model_cfg.depth, model_cfg.ffn_layer
    if ffn == "swiglu":
        ffn_per_token = 6 * d * swiglu_hidden_dim(d, model_cfg.mlp_ratio)
    else:
        ffn_per_token = 4 * d * int(d * model_cfg.mlp_ratio)
    p = model_cfg.drop_path_rate if model_cfg.drop_path_mode == "efficient" else 0.0
    total = patch_embed_flops(model_cfg, groups)
    for b, side in groups:
        n = 1 + model_cfg.num_register_tokens + (side // model_cfg.patch_size) ** 2
        attn = 8 * n * d * d + 4 * n * n * d
        kept = kept_samples(b, p) if training and p > 0 else b
        total += depth * kept * (attn + n * ffn_per_token)
    return total


def patch_embed_flops(model_cfg: Any, groups: Sequence[tuple[int, int]]) -> int:
    """``2·P·(C·p²)·D`` per sample of ``P`` patches: the patch embedding's forward over crop groups."""
    model_cfg = model_cfg.resolved()
    per_patch = 2 * model_cfg.in_chans * model_cfg.patch_size**2 * model_cfg.embed_dim
    return sum(b * (side // model_cfg.patch_size) ** 2 * per_patch for b, side in groups)


def head_forward_flops(head_cfg: Any, in_dim: int, rows: int) -> int:
    """``2·rows·(in·hidden + hidden²·(nlayers−2) + hidden·bottleneck + bottleneck·K)`` of a DINO head."""
    dims = [in_dim] + [head_cfg.hidden_dim] * (head_cfg.nlayers - 1) + [head_cfg.bottleneck_dim, head_cfg.out_dim]
    return 2 * rows * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


def ssl_step_flops(cfg: Any, batch_size: int, n_masked: int) -> int:
    """Analytic FLOPs of one self-distillation step (see docs/BENCHMARKS.md):
    ``3 × student forward`` (forward + backward) ``+ 1 × teacher forward`` (globals, no stochastic depth),
    where each forward is backbone + DINO head on the CLS rows + iBOT head on the ``n_masked`` patch rows.
    The patch embedding's backward computes no input gradient (``2×`` its forward, not ``3×``), and the
    KoLeo similarity (``2·B²·D`` per global view, forward only) is included."""
    c = cfg.data.crops
    d = cfg.model.resolved().embed_dim
    global_group = (2 * batch_size, c.global_crops_size)
    local_group = (c.local_crops_number * batch_size, c.local_crops_size)
    student_groups = [global_group] + ([local_group] if c.local_crops_number else [])
    cls_rows = (2 + c.local_crops_number) * batch_size
    ibot_cfg = cfg.ibot_loss_head()

    def heads(rows_cls: int) -> int:
        return head_forward_flops(cfg.dino_head, d, rows_cls) + head_forward_flops(ibot_cfg, d, n_masked)

    student = backbone_forward_flops(cfg.model, student_groups, training=True) + heads(cls_rows)
    teacher = backbone_forward_flops(cfg.model, [global_group], training=False) + heads(2 * batch_size)
    koleo = 2 * 2 * batch_size**2 * d if cfg.loss.koleo_weight else 0
    return 3 * student - patch_embed_flops(cfg.model, student_groups) + teacher + koleo
