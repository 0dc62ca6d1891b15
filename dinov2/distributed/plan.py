"""``dinov2-train --plan``: per-GPU memory and communication of a config at a world size and mesh,
before anything is submitted (no training, no GPU, no process group).

The networks are built on the meta device (shapes only: the model factory's ``skeleton``, no file
read), so the parameter counts are exact for any size. Per GPU, for the rank holding the largest
shards (rank 0 of its shard group):

- **exact** (checked against the real sharded tensors of a small model in ``tests/test_scale.py``):
  student parameters (fp32 shards), gradients (fp32 shards), AdamW state (``exp_avg`` and
  ``exp_avg_sq`` fp32 shards plus one 4-byte ``step`` per parameter tensor), teacher / EMA parameters
  (fp32 shards), the heads' part of all of these, and the centring buffers. A parameter of ``rows``
  rows sharded over ``S`` ranks holds ``ceil(rows / S)`` rows on rank 0 (FSDP2's ``torch.chunk``
  layout);
- **estimated**: the unsharded working set of FSDP2 (the all-gathered ``param_dtype`` copy of the
  current block and the prefetched ones, and the block's unsharded ``reduce_dtype`` gradient before
  its reduce-scatter), the student's saved activations per activation-checkpointing mode and batch
  size, and the head/loss activations. The activation model counts the tensors a pre-norm block saves
  for backward under bf16 autocast with an fp32 residual stream: per token, ``26·D + 4·H`` bytes
  (GELU MLP of width ``H``) or ``26·D + 8·H`` (SwiGLU), the input alone (``4·D``) for a checkpointed
  block plus one block recomputed in backward; head logits ``10·K`` bytes per student row (bf16
  logits, fp32 log-softmax and its gradient) and ``8·K`` per teacher row.

Communication per GPU per step (bytes each GPU receives in ring collectives, ``(S−1)/S`` of the
unsharded size): all-gathers in ``param_dtype`` (student forward, student backward again when it
reshards after forward, teacher forward), the gradients' reduce-scatter in ``reduce_dtype``, and under
HSDP the all-reduce of the reduced gradient shards across the ``R`` replicas (``2·(R−1)/R`` of a shard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from dinov2.config import Amp, Config
from dinov2.distributed.mesh import local_numel, mesh_shape
from dinov2.distributed.parallelize import AC_MODES, checkpointed_blocks

GiB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
HEAD_NAMES = ("dino_head", "ibot_head")


@dataclass
class NetworkShapes:
    name: str
    trained: bool
    shapes: dict[str, tuple[int, ...]]
    blocks: list[int] = field(default_factory=list)  # parameters per block
    runs_forward: bool = True

    def numel(self, heads_only: bool = False) -> int:
        return sum(math.prod(s) for n, s in self.shapes.items() if not heads_only or n.startswith(HEAD_NAMES))

    def local(self, shards: int, index: int = 0, heads_only: bool = False) -> int:
        return sum(
            local_numel(s, shards, index) for n, s in self.shapes.items() if not heads_only or n.startswith(HEAD_NAMES)
        )

    def padded(self, shards: int) -> int:
        return sum(local_numel(s, shards, 0) * shards for s in self.shapes.values())


def network_shapes(model: nn.Module) -> list[NetworkShapes]:
    """Parameter shapes of every network of a (meta-device) meta-architecture."""
    trained = set(model.trained_networks())
    out = []
    for name, network in model.networks().items():
        shapes = {n: tuple(p.shape) for n, p in network.named_parameters()}
        blocks = [sum(p.numel() for p in b.parameters()) for b in network.backbone.blocks]
        # EMAs of distilled students never run forward during training; the teacher always does
        runs = name in trained or name == "teacher"
        out.append(NetworkShapes(name, name in trained, shapes, blocks, runs))
    return out


@dataclass
class StateBytes:
    """Exact per-GPU bytes of the sharded state of shard ``index`` (see the module docstring)."""

    student_params: int
    student_grads: int
    optimizer: int
    teacher_params: int
    heads: int
    buffers: int

    @property
    def total(self) -> int:
        return self.student_params + self.student_grads + self.optimizer + self.teacher_params + self.buffers


def state_bytes(nets: list[NetworkShapes], cfg: Config, shards: int, index: int = 0) -> StateBytes:
    trained = [n for n in nets if n.trained]
    others = [n for n in nets if not n.trained]
    student = sum(n.local(shards, index) for n in trained)
    tensors = sum(len(n.shapes) for n in trained)
    heads = sum(16 * n.local(shards, index, True) for n in trained) + sum(
        4 * n.local(shards, index, True) for n in others
    )
    buffers = 0
    if cfg.train.objective != "copy_detection" and cfg.loss.centering == "softmax":
        ibot_dim = cfg.ibot_loss_head().out_dim
        buffers = 4 * (cfg.dino_head.out_dim + ibot_dim)
    return StateBytes(
        student_params=4 * student,
        student_grads=4 * student,
        optimizer=8 * student + 4 * tensors,
        teacher_params=4 * sum(n.local(shards, index) for n in others),
        heads=heads,
        buffers=buffers,
    )


def tokens_per_image(cfg: Config) -> tuple[int, int]:
    """(student tokens, teacher tokens) per image: 2 global crops (+ the local crops for the student)."""
    p, r = cfg.model.patch_size, cfg.model.num_register_tokens
    crops = cfg.data.crops
    glob = 1 + r + (crops.global_crops_size // p) ** 2
    loc = 1 + r + (crops.local_crops_size // p) ** 2
    return 2 * glob + crops.local_crops_number * loc, 2 * glob


def _ffn_width(network_shapes_: NetworkShapes) -> tuple[int, bool]:
    for n, s in network_shapes_.shapes.items():
        if n.endswith("blocks.0.mlp.fc1.weight"):
            return s[0], False
        if n.endswith("blocks.0.mlp.w12.weight"):
            return s[0] // 2, True
    return 0, False


def activation_bytes(cfg: Config, student: NetworkShapes, batch: int, mode: str, recompute: bool = True) -> int:
    """Estimated saved activations of one student's backbone for ``batch`` images per GPU: what the
    forward leaves for backward, plus (``recompute``) the one checkpointed block re-run in backward."""
    dim = student.shapes["backbone.cls_token"][-1]
    depth = len(student.blocks)
    hidden, swiglu = _ffn_width(student)
    scale = 1 if cfg.train.amp == Amp.bf16 else 2  # fp32 compute doubles the bf16 tensors (roughly)
    per_token_block = scale * (26 * dim + (8 if swiglu else 4) * hidden)
    tokens = tokens_per_image(cfg)[0] * batch
    checkpointed = len(checkpointed_blocks(mode, depth))
    kept = depth - checkpointed
    rerun = per_token_block if checkpointed and recompute else 0
    return tokens * (kept * per_token_block + checkpointed * 4 * dim + rerun)


def head_activation_bytes(cfg: Config, batch: int) -> int:
    """Estimated logits/loss activations: student rows (every crop's CLS and the masked patches) and
    teacher rows (global CLS and masked patches), ``K`` prototypes each."""
    if cfg.train.objective == "copy_detection":
        return 0
    crops = cfg.data.crops
    patches = (crops.global_crops_size // cfg.model.patch_size) ** 2
    ratio = sum(cfg.data.masks.mask_ratio_min_max) / 2
    masked = 2 * batch * cfg.data.masks.mask_probability * ratio * patches
    k_dino = cfg.dino_head.out_dim
    k_ibot = cfg.ibot_loss_head().out_dim
    student = (2 + crops.local_crops_number) * batch * k_dino * 10 + masked * k_ibot * 10
    teacher = 2 * batch * k_dino * 8 + masked * k_ibot * 8
    return int(student + teacher)


def working_set_bytes(cfg: Config, nets: list[NetworkShapes]) -> int:
    """Estimated unsharded FSDP2 buffers at their peak: the current and prefetched blocks' all-gathered
    parameters and the current block's unsharded gradient (the largest unit: a block or a head), plus
    the whole student's gathered parameters when it does not reshard after forward."""
    pbytes = DTYPE_BYTES[cfg.distributed.param_dtype]
    rbytes = DTYPE_BYTES[cfg.distributed.reduce_dtype]
    units = []
    for n in nets:
        units += n.blocks
        for head in HEAD_NAMES:
            units.append(sum(math.prod(s) for k, s in n.shapes.items() if k.startswith(head + ".")))
    largest = max(units)
    ahead = max(cfg.distributed.forward_prefetch, cfg.distributed.backward_prefetch)
    total = largest * pbytes * (1 + ahead) + largest * rbytes
    if not cfg.distributed.student_reshard_after_forward:
        total += sum(n.numel() for n in nets if n.trained) * pbytes
    return total


def comm_bytes(cfg: Config, nets: list[NetworkShapes], replicate: int, shards: int) -> dict[str, float]:
    pbytes = DTYPE_BYTES[cfg.distributed.param_dtype]
    rbytes = DTYPE_BYTES[cfg.distributed.reduce_dtype]
    frac = (shards - 1) / shards
    gathers = 0
    for n in nets:
        if not n.runs_forward:
            continue
        passes = 1
        if n.trained and cfg.distributed.student_reshard_after_forward:
            passes = 2
        gathers += passes * n.padded(shards)
    trained_padded = sum(n.padded(shards) for n in nets if n.trained)
    trained_local = sum(n.local(shards) for n in nets if n.trained)
    return {
        "all_gather": frac * gathers * pbytes,
        "reduce_scatter": frac * trained_padded * rbytes,
        "all_reduce": 2 * (replicate - 1) / replicate * trained_local * rbytes,
    }


def format_plan(
    cfg: Config,
    nets: list[NetworkShapes],
    world_size: int,
    gpus_per_node: int,
    gpu_gib: float = 80.0,
    batch_sizes: list[int] | None = None,
    title: str = "",
) -> tuple[str, bool]:
    """The plan as text, and whether the config's batch size and AC mode fit ``gpu_gib``. ``nets``: the
    :func:`network_shapes` of ``cfg``'s meta-architecture (``dinov2.launch.run.plan_shapes``)."""
    replicate, shards = mesh_shape(cfg.distributed.mesh, world_size, gpus_per_node)
    state = state_bytes(nets, cfg, shards)
    work = working_set_bytes(cfg, nets)
    batch = cfg.data.batch_size_per_gpu
    sizes = sorted(set((batch_sizes or []) + [batch]))
    students = [n for n in nets if n.trained]

    def peak(b: int, mode: str) -> int:
        acts = sum(activation_bytes(cfg, s, b, mode) for s in students)
        return state.total + work + acts + head_activation_bytes(cfg, b)

    g = lambda x: f"{x / GiB:8.2f}"  # noqa: E731
    counts = ", ".join(f"{n.name} {n.numel() / 1e6:.1f} M (heads {n.numel(True) / 1e6:.1f} M)" for n in nets)
    lines = [
        f"plan{': ' + title if title else ''} — {cfg.model.arch}, {world_size} GPUs "
        f"({world_size // max(gpus_per_node, 1) or 1} node(s) × {gpus_per_node}), "
        f"mesh replicate {replicate} × shard {shards}",
        f"parameters: {counts}",
        f"per GPU (largest shard), GiB{'':21}exact",
        f"  student parameters (fp32 shards)   {g(state.student_params)}",
        f"  student gradients (fp32 shards)    {g(state.student_grads)}",
        f"  AdamW state (2 × fp32 + step)      {g(state.optimizer)}",
        f"  teacher/EMA parameters (fp32)      {g(state.teacher_params)}",
        f"  buffers (centres)                  {g(state.buffers)}",
        f"  sharded state + buffers            {g(state.total)}",
        f"    of which heads                   {g(state.heads)}",
        f"  FSDP2 unsharded working set        {g(work)}   estimated",
        f"student activations + heads/losses (estimated, GiB) and peak per AC mode; fits {gpu_gib:g} GiB?",
        "  batch/GPU  mode       activations  heads    peak  fits",
    ]
    fits_config = True
    depth = max(len(s.blocks) for s in students)
    modes = sorted(AC_MODES, key=lambda m: len(checkpointed_blocks(m, depth)))  # most memory first
    for b in sizes:
        for mode in modes:
            acts = sum(activation_bytes(cfg, s, b, mode) for s in students)
            total = peak(b, mode)
            fits = total <= gpu_gib * GiB
            if b == batch and mode == cfg.distributed.activation_checkpointing:
                fits_config = fits
            mark = " <- config" if b == batch and mode == cfg.distributed.activation_checkpointing else ""
            lines.append(
                f"  {b:9d}  {mode:9s} {g(acts)}    {g(head_activation_bytes(cfg, b))} {g(total)}  "
                f"{'yes' if fits else 'NO'}{mark}"
            )
    comm = comm_bytes(cfg, nets, replicate, shards)
    lines.append(
        f"communication per GPU per step, GiB: all-gather {comm['all_gather'] / GiB:.2f} "
        f"({cfg.distributed.param_dtype}), reduce-scatter {comm['reduce_scatter'] / GiB:.2f} "
        f"({cfg.distributed.reduce_dtype}), all-reduce across replicas {comm['all_reduce'] / GiB:.2f}"
    )
    verdict = "fits" if fits_config else "does NOT fit"
    lines.append(
        f"config (batch {batch}, activation_checkpointing={cfg.distributed.activation_checkpointing}): "
        f"estimated peak {peak(batch, cfg.distributed.activation_checkpointing) / GiB:.2f} GiB — "
        f"{verdict} in {gpu_gib:g} GiB"
    )
    return "\n".join(lines), fits_config
