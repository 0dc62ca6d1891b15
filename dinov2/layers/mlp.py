"""Feed-forward networks of a transformer block: the classic GELU MLP and SwiGLU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    """Linear → GELU → Linear."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """Hidden width of a SwiGLU FFN with the parameter count of an MLP of ratio ``mlp_ratio``:
    2/3 of ``dim * mlp_ratio``, rounded up to a multiple of 8 (4096 for ViT-g's 1536 × 4)."""
    hidden = int(dim * mlp_ratio * 2 / 3)
    return (hidden + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU: ``w3(silu(x W1) * (x W2))`` with W1 and W2 fused into one GEMM (``w12``)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def build_ffn(kind: str, dim: int, mlp_ratio: float, bias: bool = True) -> nn.Module:
    if kind == "mlp":
        return Mlp(dim, int(dim * mlp_ratio), bias=bias)
    if kind == "swiglu":
        return SwiGLUFFN(dim, swiglu_hidden_dim(dim, mlp_ratio), bias=bias)
    raise ValueError(f"unknown ffn_layer '{kind}' (expected 'mlp' or 'swiglu')")
