"""Multi-head self-attention over packed crop groups, with pluggable attention backends.

The tokens of every crop group (e.g. 2B global crops of 257 tokens and 8B local crops of 50 tokens)
arrive packed as one ``(T, D)`` matrix so that the QKV and output projections are single large GEMMs.
Attention itself must stay within each sample; ``seqs`` lists ``(batch, tokens)`` per group and the
backend decides how to honour it:

- ``sdpa``: one dense ``scaled_dot_product_attention`` call per group (default; on an H100 this beat
  block-diagonal packing, see docs),
- ``math``: explicit softmax(QKᵀ/√d)V per group, the reference the others are tested against,
- ``flex``: one FlexAttention call with a document mask over all sequences,
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` over all sequences (CUDA only),
- ``xformers``: ``memory_efficient_attention`` with a block-diagonal bias, used only after a
  successful probe call on the device (an importable xFormers is not necessarily a working one).

``auto`` resolves to ``sdpa``. A backend that cannot run on the device falls back to ``sdpa`` with one
log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

Seqs = Sequence[tuple[int, int]]  # (batch, tokens) per crop group
Backend = Callable[[Tensor, Seqs], Tensor]  # (T, 3, H, hd) packed qkv -> (T, H * hd)

BACKENDS = ("auto", "sdpa", "math", "flex", "varlen", "xformers")


def _split_groups(qkv: Tensor, seqs: Seqs) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Packed ``(T, 3, H, hd)`` → per group ``q, k, v`` of shape ``(B, H, N, hd)``."""
    out = []
    for chunk, (b, n) in zip(qkv.split([b * n for b, n in seqs]), seqs, strict=True):
        q, k, v = chunk.reshape(b, n, 3, chunk.shape[-2], chunk.shape[-1]).permute(2, 0, 3, 1, 4).unbind(0)
        out.append((q, k, v))
    return out


def _merge_groups(outs: list[Tensor]) -> Tensor:
    """Per group ``(B, H, N, hd)`` → packed ``(T, H * hd)``."""
    return torch.cat([o.transpose(1, 2).reshape(-1, o.shape[1] * o.shape[3]) for o in outs])


def attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """softmax(QKᵀ/√d) computed explicitly, ``(B, H, N, N)``."""
    return torch.softmax((q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1), dim=-1)


def math_attention(qkv: Tensor, seqs: Seqs) -> Tensor:
    return _merge_groups([attention_probs(q, k) @ v for q, k, v in _split_groups(qkv, seqs)])


def sdpa_attention(qkv: Tensor, seqs: Seqs) -> Tensor:
    return _merge_groups([F.scaled_dot_product_attention(q, k, v) for q, k, v in _split_groups(qkv, seqs)])


def _seq_lengths(seqs: Seqs) -> list[int]:
    return [n for b, n in seqs for _ in range(b)]


def _cu_seqlens(seqs: Seqs, device: torch.device) -> Tensor:
    lengths = torch.tensor([0] + _seq_lengths(seqs), device=device, dtype=torch.int32)
    return torch.cumsum(lengths, 0, dtype=torch.int32)


def varlen_attention(qkv: Tensor, seqs: Seqs) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = qkv.unbind(1)  # (T, H, hd) each
    cu = _cu_seqlens(seqs, qkv.device)
    max_len = max(n for _, n in seqs)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len)
    return out.reshape(out.shape[0], -1)


class FlexAttention:
    """FlexAttention with a document mask (one document per sample), compiled once per instance."""

    def __init__(self, compile: bool) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self._fn = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def __call__(self, qkv: Tensor, seqs: Seqs) -> Tensor:
        from torch.nn.attention.flex_attention import create_block_mask

        lengths = torch.tensor(_seq_lengths(seqs), device=qkv.device)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=qkv.device), lengths)
        total = qkv.shape[0]

        def same_document(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        mask = create_block_mask(same_document, None, None, total, total, device=qkv.device)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv.unbind(1))  # (1, H, T, hd)
        out = self._fn(q, k, v, block_mask=mask)
        return out.squeeze(0).transpose(0, 1).reshape(total, -1)


def xformers_attention(qkv: Tensor, seqs: Seqs) -> Tensor:
    from xformers.ops import fmha

    bias = fmha.BlockDiagonalMask.from_seqlens(_seq_lengths(seqs))
    q, k, v = (t.unsqueeze(0) for t in qkv.unbind(1))  # (1, T, H, hd)
    out = fmha.memory_efficient_attention(q, k, v, attn_bias=bias)
    return out.reshape(qkv.shape[0], -1)


def _probe(fn: Backend, device: torch.device) -> str | None:
    """Run ``fn`` once on tiny inputs (forward and backward); return the error text if it fails."""
    try:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        qkv = torch.randn(2 * 5 + 3 * 3, 3, 2, 16, device=device, dtype=dtype, requires_grad=True)
        fn(qkv, [(2, 5), (3, 3)]).float().sum().backward()
        return None
    except Exception as e:  # noqa: BLE001 — any failure means "not usable here"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class AttentionDispatcher:
    """Resolves a backend name to a callable per device type, probing once per device type.

    One instance is shared by all blocks of a model; its memo holds at most one entry per device
    type, so it is bounded.
    """

    def __init__(self, name: str = "auto", compile_flex: bool | None = None) -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend '{name}' (choose from {', '.join(BACKENDS)})")
        self.name = name
        self.compile_flex = compile_flex
        self._resolved: dict[str, tuple[str, Backend]] = {}

    def resolve(self, device: torch.device) -> tuple[str, Backend]:
        key = device.type
        if key not in self._resolved:
            self._resolved[key] = self._choose(device)
        return self._resolved[key]

    def _choose(self, device: torch.device) -> tuple[str, Backend]:
        name = self.name
        if name in ("auto", "sdpa"):
            return "sdpa", sdpa_attention
        if name == "math":
            return "math", math_attention
        candidate: Backend
        if name == "varlen":
            if device.type != "cuda":
                return self._fallback(name, device, "varlen_attn needs CUDA")
            candidate = varlen_attention
        elif name == "flex":
            compile_flex = device.type == "cuda" if self.compile_flex is None else self.compile_flex
            try:
                candidate = FlexAttention(compile=compile_flex)
            except ImportError as e:
                return self._fallback(name, device, str(e))
        else:  # xformers
            try:
                import xformers.ops  # noqa: F401
            except Exception as e:  # noqa: BLE001 — a broken install raises more than ImportError
                return self._fallback(name, device, f"import failed ({type(e).__name__})")
            candidate = xformers_attention
        error = _probe(candidate, device)
        if error is not None:
            return self._fallback(name, device, f"probe call failed: {error}")
        logger.info("attention backend '%s' selected on %s", name, device.type)
        return name, candidate

    @staticmethod
    def _fallback(name: str, device: torch.device, reason: str) -> tuple[str, Backend]:
        logger.warning("attention backend '%s' unusable on %s (%s); falling back to sdpa", name, device.type, reason)
        return "sdpa", sdpa_attention


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

    def forward(self, x: Tensor, seqs: Seqs) -> Tensor:
        _, backend = self.dispatcher.resolve(x.device)
        return self.proj(backend(self.packed_qkv(x), seqs))

    def attention_weights(self, x: Tensor, seqs: Seqs) -> list[Tensor]:
        """Explicit attention probabilities per group, ``(B, H, N, N)`` (for attention maps)."""
        return [attention_probs(q, k) for q, k, _ in _split_groups(self.packed_qkv(x), seqs)]
