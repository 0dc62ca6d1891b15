"""Multi-head self-attention over packed crop groups, with pluggable attention backends.

The tokens of every crop group (e.g. 2B global crops of 257 tokens and 8B local crops of 50 tokens)
arrive packed as one ``(T, D)`` matrix so that the QKV and output projections are single large GEMMs.
Attention itself must stay within each sample; ``seqs`` lists ``(batch, tokens)`` per group and the
backend decides how to honour it:

- ``sdpa``: one dense ``scaled_dot_product_attention`` call per group (default; on an H100 this beat
  block-diagonal packing, see docs),
- ``math``: explicit softmax(QKᵀ/√d)V per group, the reference the others are tested against,
- ``flex``: one FlexAttention call with a document block mask over all sequences,
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` over all sequences (CUDA, fp16/bf16 only),
- ``xformers``: ``memory_efficient_attention`` with a block-diagonal bias, used only after a
  successful probe call on the device (an importable xFormers is not necessarily a working one).

``auto`` resolves to ``sdpa``.

**Resolution happens once per device type, outside any compiled region.** :class:`AttentionDispatcher`
probes the requested backend with tiny calls — forward and backward, with gradients enabled even when
the caller runs under ``no_grad``/``inference_mode`` — in fp32 and bf16 (fp16 follows bf16), and records
where it works. A dtype or mode it cannot run (varlen in fp32, flex backward on CPU) uses
sdpa instead, chosen per call from ``qkv.dtype`` and whether gradients are needed (both static for
``torch.compile``). The backbone resolves before its first block (``DinoVisionTransformer.forward``),
so a compiled or checkpointed block only ever reads the memo: dynamo sees no side effect.

**Per-forward metadata.** Backends that need more than ``seqs`` (flex: a ``BlockMask``; varlen:
``cu_seqlens``) build it in :meth:`AttentionBackend.prepare`, which the backbone calls once per
forward and per packed layout (the full layout and the stochastic-depth subset layouts), on the
device, without host synchronisation; every block then reuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.config import AttnBackend

logger = logging.getLogger(__name__)

Seqs = Sequence[tuple[int, int]]  # (batch, tokens) per crop group
Layout = tuple[tuple[int, int], ...]  # hashable form of Seqs, the key of per-forward metadata
AttentionMeta = Mapping[Layout, Any]  # layout -> what the backend prepared for it

BACKENDS = get_args(AttnBackend)
FLEX_BLOCK = 128  # FlexAttention's sparse block size (its default)


def layout(seqs: Seqs) -> Layout:
    return tuple((int(b), int(n)) for b, n in seqs)


def _split_groups(qkv: Tensor, seqs: Seqs) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Packed ``(T, 3, H, hd)`` → per group ``q, k, v`` of shape ``(B, H, N, hd)``."""
    out = []
    for chunk, (b, n) in zip(qkv.split([b * n for b, n in seqs]), seqs, strict=True):
        q, k, v = chunk.reshape(b, n, 3, chunk.shape[-2], chunk.shape[-1]).permute(2, 0, 3, 1, 4).unbind(0)
        out.append((q, k, v))
    return out


def _merge_groups(outs: list[Tensor]) -> Tensor:
    """Per group ``(B, H, N, hd)`` → packed ``(T, H * hd)``."""
    merged = [o.transpose(1, 2).reshape(-1, o.shape[1] * o.shape[3]) for o in outs]
    return merged[0] if len(merged) == 1 else torch.cat(merged)


def attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """softmax(QKᵀ/√d) computed explicitly, ``(B, H, N, N)``."""
    return torch.softmax((q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1), dim=-1)


def math_attention(qkv: Tensor, seqs: Seqs, meta: Any = None) -> Tensor:
    return _merge_groups([attention_probs(q, k) @ v for q, k, v in _split_groups(qkv, seqs)])


def sdpa_attention(qkv: Tensor, seqs: Seqs, meta: Any = None) -> Tensor:
    return _merge_groups([F.scaled_dot_product_attention(q, k, v) for q, k, v in _split_groups(qkv, seqs)])


def document_ids(seqs: Seqs, device: torch.device, length: int | None = None) -> Tensor:
    """``int32 (length,)``: the index of the sequence (sample) each packed token belongs to; positions
    past the ``T`` real tokens (``length > T``, padding) get an id of their own. Built from ``arange``
    on ``device``: no host-to-device copy."""
    parts, first = [], 0
    for b, n in seqs:
        parts.append(torch.arange(b * n, device=device, dtype=torch.int32) // n + first)
        first += b
    total = sum(b * n for b, n in seqs)
    if length is not None and length > total:
        parts.append(torch.full((length - total,), first, device=device, dtype=torch.int32))
    return torch.cat(parts)


def cu_seqlens(seqs: Seqs, device: torch.device) -> Tensor:
    """``int32 (num_sequences + 1,)`` cumulative sequence starts, built on ``device`` from ``arange``."""
    parts, offset = [], 0
    for b, n in seqs:
        parts.append(torch.arange(offset, offset + b * n, n, device=device, dtype=torch.int32))
        offset += b * n
    parts.append(torch.full((1,), offset, device=device, dtype=torch.int32))
    return torch.cat(parts)


def document_block_mask(seqs: Seqs, device: torch.device, block: int = FLEX_BLOCK):
    """The FlexAttention ``BlockMask`` of a packed layout (attend within one's own sequence only).

    Sequences are contiguous, so a ``block × block`` tile is *empty* when the ranges of sequence ids
    of its query block and key block do not overlap, *full* when both blocks lie inside one and the
    same sequence, and *partial* otherwise (only partial tiles evaluate the mask function). Memory is
    ``O(T + (T / block)²)`` — never ``T × T`` — and nothing synchronises with the host."""
    from torch.nn.attention.flex_attention import BlockMask  # lazy: ~1 s to import, only the flex backend needs it

    total = sum(b * n for b, n in seqs)
    num_blocks = -(-total // block)
    doc = document_ids(seqs, device, num_blocks * block)
    tiles = doc.view(num_blocks, block)
    first, last = tiles[:, 0], tiles[:, -1]
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    single = first == last
    full = single[:, None] & single[None, :] & (first[:, None] == first[None, :])
    partial = overlap & ~full

    def as_kv_blocks(tiles_used: Tensor) -> tuple[Tensor, Tensor]:
        counts = tiles_used.sum(-1, dtype=torch.int32)
        # the used tiles' indices first, in increasing order (a stable sort of "unused" flags)
        order = torch.argsort((~tiles_used).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    def same_document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    kv_num, kv_index = as_kv_blocks(partial)
    full_num, full_index = as_kv_blocks(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_index, full_num, full_index, BLOCK_SIZE=block, mask_mod=same_document, seq_lengths=(total, total)
    )


# ----------------------------------------------------------------------------------------- backends
class AttentionBackend:
    """``prepare(seqs, device)`` builds what one packed layout needs (once per forward, outside compiled
    regions); ``backend(qkv, seqs, meta)`` attends ``(T, 3, H, hd)`` → ``(T, H·hd)`` within sequences."""

    name = "sdpa"
    needs_meta = False

    def prepare(self, seqs: Seqs, device: torch.device) -> Any:
        return None

    def __call__(self, qkv: Tensor, seqs: Seqs, meta: Any = None) -> Tensor:
        return sdpa_attention(qkv, seqs)


class MathAttention(AttentionBackend):
    name = "math"

    def __call__(self, qkv: Tensor, seqs: Seqs, meta: Any = None) -> Tensor:
        return math_attention(qkv, seqs)


class FlexAttention(AttentionBackend):
    """FlexAttention with a document block mask (:func:`document_block_mask`).

    Inside a compiled region (a compiled block) the plain ``flex_attention`` is traced and inductor
    lowers it into the block's graph; called eagerly it goes through its own ``torch.compile`` (when
    ``compile``, static shapes: one graph per packed layout, a handful per run), as uncompiled flex
    materialises ``T × T`` scores."""

    name = "flex"
    needs_meta = True

    def __init__(self, compile: bool) -> None:
        from torch.nn.attention.flex_attention import flex_attention  # lazy: ~1 s to import

        self._flex = flex_attention
        self._eager = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def prepare(self, seqs: Seqs, device: torch.device):
        return document_block_mask(seqs, device)

    def __call__(self, qkv: Tensor, seqs: Seqs, meta: Any = None) -> Tensor:
        mask = meta if meta is not None else self.prepare(seqs, qkv.device)
        fn = self._flex if torch.compiler.is_compiling() else self._eager
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv.unbind(1))  # (1, H, T, hd)
        out = fn(q, k, v, block_mask=mask)
        return out.squeeze(0).transpose(0, 1).reshape(qkv.shape[0], -1)


class VarlenAttention(AttentionBackend):
    name = "varlen"
    needs_meta = True

    def prepare(self, seqs: Seqs, device: torch.device) -> tuple[Tensor, int]:
        return cu_seqlens(seqs, device), max(n for _, n in seqs)

    def __call__(self, qkv: Tensor, seqs: Seqs, meta: Any = None) -> Tensor:
        from torch.nn.attention.varlen import varlen_attn  # lazy: ~1-2 s to import, only this backend needs it

        cu, max_len = meta if meta is not None else self.prepare(seqs, qkv.device)
        q, k, v = qkv.unbind(1)  # (T, H, hd) each
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len)
        return out.reshape(out.shape[0], -1)


class XformersAttention(AttentionBackend):
    name = "xformers"
    needs_meta = True

    def prepare(self, seqs: Seqs, device: torch.device):
        from xformers.ops import fmha  # optional dependency (extra `xformers`)

        return fmha.BlockDiagonalMask.from_seqlens([n for b, n in seqs for _ in range(b)])

    def __call__(self, qkv: Tensor, seqs: Seqs, meta: Any = None) -> Tensor:
        from xformers.ops import fmha  # optional dependency

        bias = meta if meta is not None else self.prepare(seqs, qkv.device)
        q, k, v = (t.unsqueeze(0) for t in qkv.unbind(1))  # (1, T, H, hd)
        out = fmha.memory_efficient_attention(q, k, v, attn_bias=bias)
        return out.reshape(qkv.shape[0], -1)


SDPA = AttentionBackend()


# --------------------------------------------------------------------------------------- resolution
PROBE_SEQS = ((2, 5), (3, 3))


PROBED_DTYPES = (torch.float32, torch.bfloat16)  # fp32; bf16: autocast, FSDP bf16 parameters
SAME_AS = {torch.float16: torch.bfloat16}  # fp16 (evaluation/embedding autocast) runs where bf16 does


def _probe(fn: AttentionBackend, device: torch.device, dtype: torch.dtype, backward: bool) -> str | None:
    """Run ``fn`` once on tiny inputs; return the error text if it fails. Gradients are enabled for the
    probe whatever the caller's mode (``no_grad``, ``inference_mode``)."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            total = sum(b * n for b, n in PROBE_SEQS)
            qkv = torch.randn(total, 3, 2, 16, device=device, dtype=dtype, requires_grad=backward)
            out = fn(qkv, PROBE_SEQS, fn.prepare(PROBE_SEQS, device))
            if backward:
                out.float().sum().backward()
        return None
    except Exception as e:  # noqa: BLE001 — any failure means "not usable here"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@dataclass(frozen=True)
class Resolved:
    """What one device type runs: ``backend`` where it worked in the probe, sdpa elsewhere."""

    backend: AttentionBackend
    with_grad: frozenset[torch.dtype]  # dtypes where forward + backward worked
    without_grad: frozenset[torch.dtype]  # dtypes where the forward worked

    def pick(self, dtype: torch.dtype, needs_grad: bool) -> AttentionBackend:
        usable = self.with_grad if needs_grad else self.without_grad
        return self.backend if dtype in usable else SDPA


class AttentionDispatcher:
    """Resolves a backend name per device type, probing once (see the module docstring).

    One instance is shared by all blocks of a model; its memo holds at most one entry per device
    type, so it is bounded. :meth:`resolve` must run outside compiled regions (the backbone calls it
    before its blocks); inside them :meth:`lookup` only reads the memo."""

    def __init__(self, name: str = "auto", compile_flex: bool | None = None) -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend '{name}' (choose from {', '.join(BACKENDS)})")
        self.name = name
        self.compile_flex = compile_flex
        self._resolved: dict[str, Resolved] = {}

    def resolve(self, device: torch.device) -> tuple[str, AttentionBackend]:
        """``(name, backend)`` selected on ``device``; probes on the first call per device type."""
        key = device.type
        if key not in self._resolved:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"attention backend '{self.name}' is not resolved on {key}: resolve it before compiling "
                    "(DinoVisionTransformer.resolve_attention or one eager forward)"
                )
            self._resolved[key] = self._choose(device)
        chosen = self._resolved[key]
        return (chosen.backend.name, chosen.backend) if chosen.with_grad or chosen.without_grad else ("sdpa", SDPA)

    def lookup(self, qkv: Tensor) -> AttentionBackend:
        """The backend for this call (by device, dtype and whether gradients are needed)."""
        chosen = self._resolved.get(qkv.device.type)
        if chosen is None:  # a block used on its own, eagerly
            self.resolve(qkv.device)
            chosen = self._resolved[qkv.device.type]
        return chosen.pick(qkv.dtype, torch.is_grad_enabled() and qkv.requires_grad)

    def _choose(self, device: torch.device) -> Resolved:
        name = self.name
        everywhere = frozenset(PROBED_DTYPES) | frozenset(SAME_AS)
        if name in ("auto", "sdpa"):
            return Resolved(SDPA, everywhere, everywhere)
        if name == "math":
            return Resolved(MathAttention(), everywhere, everywhere)
        candidate: AttentionBackend
        if name == "varlen":
            if device.type != "cuda":
                return self._fallback(name, device, "varlen_attn needs CUDA")
            candidate = VarlenAttention()
        elif name == "flex":
            compile_flex = device.type == "cuda" if self.compile_flex is None else self.compile_flex
            try:
                candidate = FlexAttention(compile=compile_flex)
            except ImportError as e:
                return self._fallback(name, device, str(e))
        else:  # xformers
            try:
                import xformers.ops  # noqa: F401 — optional dependency: probe that it imports
            except Exception as e:  # noqa: BLE001 — a broken install raises more than ImportError
                return self._fallback(name, device, f"import failed ({type(e).__name__})")
            candidate = XformersAttention()
        with_grad, without_grad, errors = set(), set(), {}
        for dtype in PROBED_DTYPES:  # each probe of a compiled backend is a compilation: as few as possible
            error = _probe(candidate, device, dtype, backward=True)
            if error is None:
                with_grad.add(dtype)
                without_grad.add(dtype)
                continue
            errors[dtype] = error
            if _probe(candidate, device, dtype, backward=False) is None:
                without_grad.add(dtype)
        for dtype, like in SAME_AS.items():
            with_grad |= {dtype} if like in with_grad else set()
            without_grad |= {dtype} if like in without_grad else set()
        if not without_grad:
            return self._fallback(name, device, f"probe call failed: {next(iter(errors.values()))}")
        if errors:
            where = {}  # one clause per (where sdpa is used instead, why)
            for dtype, error in sorted(errors.items(), key=lambda item: str(item[0])):
                when = "where gradients are needed" if dtype in without_grad else "always"
                where.setdefault((when, error), []).append(str(dtype).removeprefix("torch."))
            logger.warning(
                "attention backend '%s' on %s: sdpa is used instead %s",
                name,
                device.type,
                "; ".join(f"{when} in {', '.join(dts)} ({error})" for (when, error), dts in where.items()),
            )
        else:
            logger.info("attention backend '%s' selected on %s", name, device.type)
        return Resolved(candidate, frozenset(with_grad), frozenset(without_grad))

    @staticmethod
    def _fallback(name: str, device: torch.device, reason: str) -> Resolved:
        logger.warning("attention backend '%s' unusable on %s (%s); falling back to sdpa", name, device.type, reason)
        return Resolved(SDPA, frozenset(), frozenset())


def prepare_attention(
    backend: AttentionBackend, layouts: Sequence[Layout], device: torch.device
) -> AttentionMeta | None:
    """Per-forward metadata of ``backend`` for each packed layout (None when it needs none)."""
    if not backend.needs_meta:
        return None
    return {lay: backend.prepare(lay, device) for lay in dict.fromkeys(layouts)}


class Attention(nn.Module):
    """Multi-head self-attention on packed tokens ``(T, D)`` of several crop groups."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        dispatcher: AttentionDispatcher | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.dispatcher = dispatcher or AttentionDispatcher("auto")

    def packed_qkv(self, x: Tensor) -> Tensor:
        return self.qkv(x).reshape(x.shape[0], 3, self.num_heads, self.head_dim)

    def forward(self, x: Tensor, seqs: Seqs, meta: AttentionMeta | None = None) -> Tensor:
        qkv = self.packed_qkv(x)
        backend = self.dispatcher.lookup(qkv)
        prepared = meta.get(layout(seqs)) if meta is not None and backend.needs_meta else None
        return self.proj(backend(qkv, seqs, prepared))

    def attention_weights(self, x: Tensor, seqs: Seqs) -> list[Tensor]:
        """Explicit attention probabilities per group, ``(B, H, N, N)`` (for attention maps)."""
        return [attention_probs(q, k) for q, k, _ in _split_groups(self.packed_qkv(x), seqs)]
